"""Training checkpoints: atomic writes, the last k kept, the latest found for resume.

A checkpoint holds the backbone under ``arch``/``in_chans``/``backbone`` (torchvision key names),
so :func:`cxrtune.models.backbone.load_backbone` reads it directly, plus everything an exact
resume needs: the rest of the method's state (heads, queue, EMA encoders, DINO centre), the
optimiser, the schedule step and every random generator state, all as tensors and plain types
(``torch.load(weights_only=True)`` reads it).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from cxrtune.models.backbone import CheckpointError

FORMAT = "cxrtune-pretrain-v1"
_NAME = re.compile(r"^epoch-(\d{4,})\.pt$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: str | Path, epoch: int) -> Path:
    return checkpoint_dir(run_dir) / f"epoch-{epoch:04d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def save_checkpoint(payload: dict[str, Any], path: Path, keep: int | None = None) -> Path:
    """Write to a temporary file in the same folder, flush to disk, rename; then prune old ones."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    if keep is not None:
        for _, old in list_checkpoints(path.parent.parent)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a cxrtune pretraining checkpoint (format {FORMAT})")
    return payload
