"""ResNet backbones for greyscale radiographs.

Input is one channel: a radiograph has no colour, and a 1-channel stem saves a third of the first
convolution's work. torchvision's ImageNet weights still load: their first-layer RGB filters are
summed over the colour axis (timm's ``in_chans=1`` rule), which gives the same response to a grey
image replicated to three channels. ``in_chans=3`` keeps the stock stem for users who replicate
grey to RGB themselves.

The backbone maps a normalised batch ``(B, C, H, W)`` to global-average-pooled features
``(B, feature_dim)``; ``trunk`` is the torchvision ResNet without its ``fc`` layer, so its
state_dict keys are torchvision's (``conv1.weight``, ``layer1.0.conv1.weight``, ...) and an exported
backbone loads into ``torchvision.models.resnet18/50`` with ``strict=True`` once an ``fc`` is added.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn
import torchvision

from cxrtune.errors import CxrtuneError

ARCHS = {"resnet18": 512, "resnet50": 2048}
#: Channels of the stem (stride 2) and of layer1..layer4 (strides 4, 8, 16, 32), for dense heads.
STAGE_CHANNELS = {"resnet18": (64, 64, 128, 256, 512), "resnet50": (64, 256, 512, 1024, 2048)}
INITS = ("random", "imagenet")
IMAGENET_WEIGHTS = {"resnet18": "ResNet18_Weights.IMAGENET1K_V1", "resnet50": "ResNet50_Weights.IMAGENET1K_V1"}


class CheckpointError(CxrtuneError):
    """A checkpoint is missing, corrupt, or of another architecture or method."""


class Backbone(nn.Module):
    def __init__(self, arch: str = "resnet18", in_chans: int = 1) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise CheckpointError(f"arch = {arch!r} is not supported: use one of {', '.join(ARCHS)}")
        if in_chans not in (1, 3):
            raise CheckpointError(f"in_chans = {in_chans} is not supported: use 1 or 3")
        trunk = getattr(torchvision.models, arch)(weights=None)
        if in_chans == 1:
            trunk.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        trunk.fc = nn.Identity()
        self.trunk = trunk
        self.arch = arch
        self.in_chans = in_chans
        self.feature_dim = ARCHS[arch]
        self.stage_channels = STAGE_CHANNELS[arch]
        #: Recompute each stage's activations in the backward pass instead of storing them: trades
        #: ~30 % more compute for memory (the study needed it for BarlowTwins at batch 512).
        #: Note: BatchNorm running statistics are updated again during recomputation.
        self.grad_checkpointing = False
        #: Feed NHWC tensors to the convolutions (faster with bf16 on GPUs).
        self.channels_last = False

    def _fit_channels(self, x: torch.Tensor) -> torch.Tensor:
        # Views are greyscale; a 3-channel stem gets the grey replicated (a view, no copy).
        if self.in_chans == 3 and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._fit_channels(x)
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return torch.flatten(self.trunk.avgpool(self.stage_features(x)[-1]), 1)
        return self.trunk(x)

    def stage_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[stem (stride 2), layer1 (4), layer2 (8), layer3 (16), layer4 (32)] feature maps."""
        x = self._fit_channels(x)
        t = self.trunk
        checkpointing = self.grad_checkpointing and self.training and torch.is_grad_enabled()

        def run(module: nn.Module, inp: torch.Tensor) -> torch.Tensor:
            if checkpointing:
                return torch.utils.checkpoint.checkpoint(module, inp, use_reentrant=False)
            return module(inp)

        stem = t.relu(t.bn1(t.conv1(x)))
        outs = [stem]
        x = t.maxpool(stem)
        for layer in (t.layer1, t.layer2, t.layer3, t.layer4):
            x = run(layer, x)
            outs.append(x)
        return outs

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's spatial map (B, feature_dim, h, w), for Grad-CAM and dense heads."""
        t = self.trunk
        x = t.maxpool(t.relu(t.bn1(t.conv1(x))))
        return t.layer4(t.layer3(t.layer2(t.layer1(x))))

    def torchvision_state_dict(self) -> dict[str, torch.Tensor]:
        """Keys as torchvision names them (without ``fc``)."""
        return {k: v.detach().clone() for k, v in self.trunk.state_dict().items() if not k.startswith("fc.")}


def adapt_first_conv(state: dict[str, torch.Tensor], in_chans: int) -> dict[str, torch.Tensor]:
    """Make a torchvision state_dict's ``conv1.weight`` fit ``in_chans`` input channels."""
    w = state.get("conv1.weight")
    if w is None or w.shape[1] == in_chans:
        return state
    state = dict(state)
    if in_chans == 1 and w.shape[1] == 3:
        state["conv1.weight"] = w.sum(dim=1, keepdim=True)
    elif in_chans == 3 and w.shape[1] == 1:
        state["conv1.weight"] = w.repeat(1, 3, 1, 1) / 3.0
    else:
        raise CheckpointError(f"conv1.weight has {w.shape[1]} input channels; cannot adapt to {in_chans}")
    return state


def load_torchvision_weights(backbone: Backbone, weights: str | Path | None) -> None:
    """Load ImageNet weights from a local file, or torchvision's own cache when already present.

    Nothing is downloaded: offline machines get a message naming the file to fetch and where.
    """
    arch = backbone.arch
    if weights is None:
        enum_name = IMAGENET_WEIGHTS[arch]
        cls_name, member = enum_name.split(".")
        url = getattr(getattr(torchvision.models, cls_name), member).url
        hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
        path = hub_dir / Path(url).name
        if not path.is_file():
            raise CheckpointError(
                f"ImageNet weights for {arch} are not on this machine and cxrtune does not download "
                f"at run time. Fetch {url} and pass --weights PATH, or place it at {path}"
            )
        weights = path
    path = Path(weights)
    state = _load_file(path, "weights file", "could not be read")
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    state = adapt_first_conv(state, backbone.in_chans)
    try:
        missing, unexpected = backbone.trunk.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # tensor size mismatches: weights of another architecture
        raise CheckpointError(f"weights file {path} does not match {arch}: {str(exc).splitlines()[0]} "
                              "(are they the weights of another architecture?)") from exc
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise CheckpointError(
            f"weights file {path} does not match {arch}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )


def build_backbone(arch: str = "resnet18", init: str = "random", weights: str | Path | None = None,
                   in_chans: int = 1, seed: int | None = None) -> Backbone:
    """A backbone with ``init`` = random | imagenet | a path to a cxrtune checkpoint."""
    if seed is not None:
        torch.manual_seed(seed)
    if init == "random":
        return Backbone(arch, in_chans)
    if init == "imagenet":
        backbone = Backbone(arch, in_chans)
        load_torchvision_weights(backbone, weights)
        return backbone
    path = Path(init)
    if path.suffix in (".pt", ".pth", ".ckpt") or path.exists():
        return load_backbone(path, arch=arch)
    raise CheckpointError(f"init = {init!r} is not valid: use random, imagenet or a checkpoint path")


CHECKPOINT_FORMAT = "cxrtune-backbone-v1"


def save_backbone(backbone: Backbone, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Save a backbone with its architecture and free-form metadata (tensors and plain types)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "arch": backbone.arch,
        "in_chans": backbone.in_chans,
        "backbone": backbone.torchvision_state_dict(),
        "meta": dict(meta or {}),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def _exported_payload(state: dict[str, Any], path: Path) -> dict[str, Any]:
    """Wrap a plain torchvision-key state_dict (what ``cxrtune export`` writes) as a payload.

    The architecture follows from the keys (ResNet50's bottleneck blocks have ``conv3``); a
    3-channel ``conv1`` is kept as the stock stem (grey is replicated to RGB at input).
    """
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path} is a dict but not a state_dict of tensors")
    arch = "resnet50" if "layer1.0.conv3.weight" in state else "resnet18"
    in_chans = int(state["conv1.weight"].shape[1])
    return {"arch": arch, "in_chans": in_chans, "backbone": {k: v for k, v in state.items() if not k.startswith("fc.")}}


def _load_file(path: Path, what: str, unreadable: str) -> Any:
    """``torch.load`` with tensors only (never unpickles code), naming the file when it fails."""
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{what} {path} {unreadable} ({type(exc).__name__}: {exc})") from exc


def load_backbone(path: str | Path, arch: str | None = None) -> Backbone:
    """Load a backbone saved by :func:`save_backbone`, embedded in a training checkpoint, or
    exported by ``cxrtune export`` (a plain torchvision state_dict).

    A training checkpoint (see ``cxrtune.engine``) carries the backbone under the same keys.
    ``arch`` given and different from the file's raises :class:`CheckpointError`.
    """
    path = Path(path)
    payload = _load_file(path, "checkpoint", "is corrupt or not a torch file")
    if isinstance(payload, dict) and "conv1.weight" in payload and "backbone" not in payload:
        payload = _exported_payload(payload, path)  # a `cxrtune export` state_dict
    if not isinstance(payload, dict) or "backbone" not in payload or "arch" not in payload:
        raise CheckpointError(
            f"checkpoint {path} is not a cxrtune checkpoint (no 'arch'/'backbone' entries); "
            "for torchvision weights use --init imagenet --weights PATH"
        )
    if arch is not None and payload["arch"] != arch:
        raise CheckpointError(f"checkpoint {path} holds a {payload['arch']} backbone, not the requested {arch}")
    backbone = Backbone(payload["arch"], int(payload.get("in_chans", 1)))
    # a warmup-stable-decay run's checkpoint offers its cooldown branch's backbone (cxrtune.engine.cooldown)
    weights = payload.get("judged_backbone", payload["backbone"])
    try:
        backbone.trunk.load_state_dict(weights, strict=False)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path} does not fit a {payload['arch']} backbone: {exc}") from exc
    missing, unexpected = backbone.trunk.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not fit a {payload['arch']} backbone: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    backbone.checkpoint_meta = payload.get("meta", {})
    return backbone
