"""One rule for device names everywhere: ``auto`` picks CUDA when present, else the CPU."""

from __future__ import annotations

import torch

from cxrtune.errors import ConfigError


def resolve_device(name: str, what: str = "device") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> a torch device; ``what`` names the setting in errors."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"{what} = {name!r} is not a device: use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{what} = {name!r} but CUDA is not available here: use cpu or auto")
    return device
