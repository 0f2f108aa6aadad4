"""One rule for device names everywhere: ``auto`` picks CUDA when present, else the CPU.

An explicit GPU request (``cuda``, ``cuda:N``) on a machine without CUDA, or naming a GPU it does
not have, is refused with a :class:`ConfigError` rather than failing later inside torch; so is any
other device type (``mps``, ``xpu``, ...): cxrtune runs on the CPU or CUDA only.
"""

from __future__ import annotations

import torch

from cxrtune.errors import ConfigError

VALID = "use auto, cpu, cuda or cuda:N"


def resolve_device(name: str, what: str = "device") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> a torch device; ``what`` names the setting in errors."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"{what} = {name!r} is not a device: {VALID}") from exc
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{what} = {name!r}: cxrtune runs on the CPU or CUDA GPUs only: {VALID}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{what} = {name!r} but CUDA is not available here: use cpu or auto")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(f"{what} = {name!r} but this machine has {count} CUDA device(s): "
                              f"use cuda:0 to cuda:{count - 1}, cuda or auto")
    return device
