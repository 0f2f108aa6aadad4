"""Batched augmentation on the training device, with independent random parameters per image.

Why not torchvision: ``transforms.v2`` applied to a batch tensor draws *one* set of random
parameters for the whole batch, so every image of a batch would get the same crop: useless for
SSL views. Why not per-sample transforms in data-loading workers: decoding and per-image Python
work on the CPU is what starved the study's GPU. Here a batch of uint8 images arrives on the
device and every step is one batched tensor operation:

1. random resized crop, horizontal flip and rotation, fused into one affine map per image and
   applied by a single sampling grid + ``grid_sample`` (bilinear, zeros outside the image);
2. brightness and contrast jitter (torchvision's blend rules), per image, with probability,
   fused with the normalisation (the X-ray mean and std unless the caller gives its own);
3. Gaussian blur with a per-image sigma: a separable per-image convolution (reflect padding); on
   CPU only the blurred images are convolved, on a GPU the others get a delta kernel;
4. additive Gaussian noise (on CPU from a 65,536-level inverse-CDF table, see ``gaussian_noise``).

Deviations from torchvision, on purpose: a crop whose side would exceed the image is clamped to
the image instead of re-drawn (torchvision tries 10 times, then falls back to a centre crop);
brightness is applied before contrast (ColorJitter shuffles their order); downscaling is bilinear
without antialiasing, so build the cache near the training size (256 for 224, 64-96 for 64).

All randomness comes from one ``torch.Generator`` on the device, whose state the training loop
checkpoints: a resumed run draws the same views.

Pretraining and few-shot finetuning (``cxrtune.evaluate.finetune``) both draw their views here.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cxrtune.config import Config, param
from cxrtune.errors import ConfigError

XRAY_MEAN = 0.4776
XRAY_STD = 0.2674


@dataclass
class AugmentConfig(Config):
    """One view recipe. Defaults: the study's MoCo v2 + variance recipe (224 px)."""

    crop_scale_min: float = param(0.08, low=0, high=1, low_open=True, doc="random resized crop: smallest area fraction")
    crop_scale_max: float = param(1.0, low=0, high=1, low_open=True, doc="random resized crop: largest area fraction")
    crop_ratio_min: float = param(3 / 4, low=0, low_open=True, doc="smallest width/height ratio of the crop")
    crop_ratio_max: float = param(4 / 3, low=0, low_open=True, doc="largest width/height ratio of the crop")
    hflip_p: float = param(0.5, low=0, high=1, doc="probability of a horizontal flip")
    rotation_deg: float = param(10.0, low=0, high=180, doc="rotation drawn uniformly in +-this many degrees")
    jitter_p: float = param(0.8, low=0, high=1, doc="probability of brightness/contrast jitter")
    brightness: float = param(0.8, low=0, doc="brightness factor drawn in [max(0, 1-b), 1+b]")
    contrast: float = param(0.8, low=0, doc="contrast factor drawn in [max(0, 1-c), 1+c]")
    blur_p: float = param(0.5, low=0, high=1, doc="probability of Gaussian blur")
    blur_kernel: int = param(9, low=1, doc="Gaussian blur kernel size (odd), at the training size")
    blur_sigma_min: float = param(0.1, low=0, low_open=True, doc="smallest blur sigma (px)")
    blur_sigma_max: float = param(2.0, low=0, low_open=True, doc="largest blur sigma (px)")
    noise_std: float = param(0.1, low=0, doc="std of additive Gaussian noise, in normalised units")
    noise_p: float = param(1.0, low=0, high=1, doc="probability of adding noise to an image")

    def validate(self) -> None:
        if self.crop_scale_min > self.crop_scale_max:
            raise ConfigError(f"AugmentConfig.crop_scale_min = {self.crop_scale_min} exceeds crop_scale_max = {self.crop_scale_max}")
        if self.crop_ratio_min > self.crop_ratio_max:
            raise ConfigError(f"AugmentConfig.crop_ratio_min = {self.crop_ratio_min} exceeds crop_ratio_max = {self.crop_ratio_max}")
        if self.blur_kernel % 2 == 0:
            raise ConfigError(f"AugmentConfig.blur_kernel = {self.blur_kernel} must be odd")
        if self.blur_sigma_min > self.blur_sigma_max:
            raise ConfigError(f"AugmentConfig.blur_sigma_min = {self.blur_sigma_min} exceeds blur_sigma_max = {self.blur_sigma_max}")


@dataclass
class ViewParams:
    """Per-image parameters of one batch of views; every field has the batch as first axis."""

    crop_w: torch.Tensor      # crop width as a fraction of the image width
    crop_h: torch.Tensor
    center_x: torch.Tensor    # crop centre in [-1, 1] (grid_sample coordinates)
    center_y: torch.Tensor
    flip: torch.Tensor        # bool
    angle: torch.Tensor       # radians
    brightness: torch.Tensor  # factor, 1 = unchanged
    contrast: torch.Tensor
    blur_sigma: torch.Tensor  # 0 = no blur
    noise: torch.Tensor       # bool

    @staticmethod
    def identity(n: int, device: torch.device | str = "cpu") -> "ViewParams":
        ones, zeros = torch.ones(n, device=device), torch.zeros(n, device=device)
        no = torch.zeros(n, dtype=torch.bool, device=device)
        return ViewParams(ones, ones.clone(), zeros, zeros.clone(), no, zeros.clone(), ones.clone(), ones.clone(),
                          zeros.clone(), no.clone())


def _uniform(n: int, low: float, high: float, g: torch.Generator, device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=g, device=device)


def sample_params(n: int, config: AugmentConfig, generator: torch.Generator,
                  scale: tuple[float, float] | None = None) -> ViewParams:
    """Draw independent parameters for ``n`` images; ``scale`` overrides the crop area range."""
    device = generator.device
    c = config
    lo, hi = scale if scale is not None else (c.crop_scale_min, c.crop_scale_max)
    area = _uniform(n, lo, hi, generator, device)
    log_ratio = _uniform(n, math.log(c.crop_ratio_min), math.log(c.crop_ratio_max), generator, device)
    ratio = torch.exp(log_ratio)
    crop_w = torch.sqrt(area * ratio).clamp(max=1.0)
    crop_h = torch.sqrt(area / ratio).clamp(max=1.0)
    center_x = (1 - crop_w) * (2 * torch.rand(n, generator=generator, device=device) - 1)
    center_y = (1 - crop_h) * (2 * torch.rand(n, generator=generator, device=device) - 1)
    flip = torch.rand(n, generator=generator, device=device) < c.hflip_p
    angle = _uniform(n, -c.rotation_deg, c.rotation_deg, generator, device) * (math.pi / 180)
    jitter = torch.rand(n, generator=generator, device=device) < c.jitter_p
    brightness = _uniform(n, max(0.0, 1 - c.brightness), 1 + c.brightness, generator, device)
    contrast = _uniform(n, max(0.0, 1 - c.contrast), 1 + c.contrast, generator, device)
    brightness = torch.where(jitter, brightness, torch.ones_like(brightness))
    contrast = torch.where(jitter, contrast, torch.ones_like(contrast))
    blur = torch.rand(n, generator=generator, device=device) < c.blur_p
    sigma = _uniform(n, c.blur_sigma_min, c.blur_sigma_max, generator, device)
    sigma = torch.where(blur, sigma, torch.zeros_like(sigma))
    noise = torch.rand(n, generator=generator, device=device) < c.noise_p
    return ViewParams(crop_w, crop_h, center_x, center_y, flip, angle, brightness, contrast, sigma, noise)


def affine_matrices(p: ViewParams) -> torch.Tensor:
    """(B, 2, 3) maps from output to input coordinates: crop o flip o rotation, one per image.

    An output point u (in [-1, 1]^2) is rotated, flipped, scaled by the crop size and moved to
    the crop centre; with identity parameters the matrix is [[1, 0, 0], [0, 1, 0]].
    """
    cos, sin = torch.cos(p.angle), torch.sin(p.angle)
    f = torch.where(p.flip, -torch.ones_like(cos), torch.ones_like(cos))
    row0 = torch.stack([p.crop_w * f * cos, -p.crop_w * f * sin, p.center_x], dim=1)
    row1 = torch.stack([p.crop_h * sin, p.crop_h * cos, p.center_y], dim=1)
    return torch.stack([row0, row1], dim=1)


def as_uint8_batch(images: torch.Tensor) -> torch.Tensor:
    """Check a uint8 cache batch and give it a channel axis: (B, S, S) or (B, 1, S, S) -> (B, 1, S, S)."""
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 from the image cache, got {images.dtype}")
    if images.ndim == 3:
        images = images.unsqueeze(1)
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"images must be (B, S, S) or (B, 1, S, S), got {tuple(images.shape)}")
    return images


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, S, S) or (B, 1, S, S) -> float32 (B, 1, S, S) in [0, 1]."""
    return as_uint8_batch(images).float().div_(255.0)


def gaussian_kernels(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """(B, size) normalised 1-D Gaussian kernels; sigma 0 gives a delta (no blur)."""
    half = (size - 1) / 2
    x = torch.linspace(-half, half, size, device=sigma.device)
    safe = sigma.clamp_min(1e-6)[:, None]
    k = torch.exp(-0.5 * (x[None, :] / safe) ** 2)
    k = k / k.sum(dim=1, keepdim=True)
    delta = (x.abs() < 0.5).to(k.dtype).expand_as(k)
    return torch.where((sigma > 0)[:, None], k, delta)


def blur(images: torch.Tensor, sigma: torch.Tensor, size: int) -> torch.Tensor:
    """Per-image separable Gaussian blur of (B, 1, H, W) with reflect padding; sigma 0 = unchanged.

    On CPU only the images to blur are convolved; on a GPU every image is, with a delta kernel
    where sigma is 0, which avoids a device-to-host synchronisation.
    """
    return _blur_in_place(images.clone(), sigma, size)


def _blur_in_place(images: torch.Tensor, sigma: torch.Tensor, size: int) -> torch.Tensor:
    """:func:`blur` for a tensor the caller owns: on CPU the blurred subset is written back in place."""
    if size <= 1:
        return images
    if images.device.type != "cpu":
        return _grouped_blur(images, sigma, size)
    chosen = torch.nonzero(sigma > 0).flatten()
    if chosen.numel() == images.shape[0]:
        return _grouped_blur(images, sigma, size)
    if chosen.numel():
        images[chosen] = _grouped_blur(images[chosen], sigma[chosen], size)
    return images


def _grouped_blur(images: torch.Tensor, sigma: torch.Tensor, size: int,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Separable blur: a depthwise 1-D convolution over rows, then shifted sums over rows.

    Each row is its own convolution group with its image's kernel: on CPU this measured about
    twice as fast as a grouped 2-D convolution with one group per image. The vertical pass adds
    ``size`` shifted copies of whole rows, weighted per image, which needs no transpose. ``out``
    may be ``images`` itself: the result is written there.
    """
    b, c, h, w = images.shape
    k = gaussian_kernels(sigma, size).to(images.dtype).repeat_interleave(c, dim=0)  # (b*c, size)
    pad = size // 2
    x = F.pad(images.reshape(b * c, 1, h, w), (pad, pad, 0, 0), mode="reflect").reshape(1, b * c * h, w + 2 * pad)
    x = F.conv1d(x, k.repeat_interleave(h, dim=0)[:, None, :], groups=b * c * h)
    x = F.pad(x.reshape(b * c, 1, h, w), (0, 0, pad, pad), mode="reflect").reshape(b * c, h + 2 * pad, w)
    weights = k.reshape(b * c, size, 1, 1)
    result = torch.mul(x[:, :h], weights[:, 0], out=None if out is None else out.view(b * c, h, w))
    for shift in range(1, size):
        result.addcmul_(x[:, shift:shift + h], weights[:, shift])
    return result.reshape(b, c, h, w)


def sampling_grid(theta: torch.Tensor, out_size: int) -> torch.Tensor:
    """``F.affine_grid(theta, (B, 1, out, out), align_corners=False)`` as one small matmul.

    Same numbers, several times faster on CPU than affine_grid, which multiplies every point of
    a materialised (out*out, 3) base grid. Here the grid row of output row y is
    ``[1, v_y] @ M`` with ``M[0] = t_.0 * u + t_.2`` and ``M[1] = t_.1`` (interleaved x, y), a
    (out, 2) x (2, 2*out) product per image that writes the grid contiguously.
    """
    n = theta.shape[0]
    base, rows = _grid_axes(out_size, theta.device, theta.dtype)
    t = theta.reshape(n, 1, 2, 3)
    cols = torch.empty(n, 2, out_size, 2, device=theta.device, dtype=theta.dtype)
    torch.addcmul(t[..., 2], base.view(1, -1, 1), t[..., 0], out=cols[:, 0])
    cols[:, 1] = t[..., 1]
    return torch.matmul(rows, cols.view(n, 2, 2 * out_size)).view(n, out_size, out_size, 2)


@functools.lru_cache(maxsize=16)
def _grid_axes(out_size: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel centres in [-1, 1] (out,) and the rows ``[1, v]`` (out, 2); cached, as every chunk needs them."""
    base = (torch.arange(out_size, device=device, dtype=dtype) * 2 + 1) / out_size - 1
    return base, torch.stack([torch.ones_like(base), base], dim=1)


#: Images per chunk on CPU: a chunk's intermediate tensors stay in the cache between the steps,
#: which measured ~2x faster than whole-batch passes at 224 px. GPUs take the whole batch.
CPU_CHUNK = 8

#: Bits of the inverse-CDF table behind CPU noise (see :func:`gaussian_noise`).
NOISE_TABLE_BITS = 16


@functools.cache
def normal_table() -> torch.Tensor:
    """(2**16,) float32 values of a standard normal, one per 1/65536 slice of probability.

    Entry i is the mean of a standard normal restricted to its i-th equal-probability slice,
    rescaled so the table has variance exactly 1 (mean 0 by symmetry). A uniform 16-bit index
    into it is a Gaussian discretised to 65,536 levels: its CDF is within 1/65536 of the normal
    CDF everywhere, and its largest value is 4.39 std, beyond which a continuous draw falls once
    in ~90,000.
    """
    n = 2 ** NOISE_TABLE_BITS
    edges = torch.special.ndtri(torch.arange(n + 1, dtype=torch.float64) / n)  # -inf .. inf
    density = torch.exp(-0.5 * edges ** 2) / math.sqrt(2 * math.pi)           # 0 at +-inf
    means = (density[:-1] - density[1:]) * n
    return (means / means.pow(2).mean().sqrt()).float()


@functools.lru_cache(maxsize=4)
def _scaled_normal_table(std: float) -> torch.Tensor:
    return normal_table() * std


def gaussian_noise(shape: tuple[int, ...], std: float, generator: torch.Generator) -> torch.Tensor:
    """float32 noise of ``shape``, mean 0 and ``std``: on CPU from 16 random bits per value.

    On CPU ``normal_`` spends most of its time in the Mersenne twister, one 32-bit draw per value;
    here one 64-bit draw gives four table indices (see :func:`normal_table`), which measured ~2x
    faster for the same Gaussian up to the table's 65,536 levels. Other devices use ``normal_``.
    """
    device = generator.device
    if device.type != "cpu":
        return torch.empty(shape, device=device).normal_(0.0, std, generator=generator)
    numel = math.prod(shape)
    bits = torch.empty((numel + 3) // 4, dtype=torch.int64).random_(-(2 ** 63), None, generator=generator)
    index = bits.view(torch.uint16)[:numel].int()
    return _scaled_normal_table(std).index_select(0, index).view(shape)


def apply_params(images: torch.Tensor, p: ViewParams, out_size: int, config: AugmentConfig,
                 generator: torch.Generator | None = None, chunk: int | None = None,
                 mean: float = XRAY_MEAN, std: float = XRAY_STD) -> torch.Tensor:
    """uint8 batch -> normalised float views (B, 1, out_size, out_size) with the given parameters.

    ``mean`` and ``std`` normalise the [0, 1] intensities (an evaluation's preprocessing may set
    its own); the noise is added after, in those normalised units.
    """
    images = as_uint8_batch(images)
    n = images.shape[0]
    on_cpu = images.device.type == "cpu"
    chunk = max(1, chunk or (CPU_CHUNK if on_cpu else n))
    # On a GPU, asking whether any image gets noise would synchronise with the host: add zeros instead.
    add_noise = config.noise_std > 0 and (not on_cpu or bool(p.noise.any()))
    if add_noise and generator is None:
        raise ValueError("a generator is needed to draw the noise")
    out = torch.empty(n, 1, out_size, out_size, device=images.device)
    # 1/255 folds into the brightness factor, applied right after the conversion from uint8.
    per_image = [affine_matrices(p).float(), (p.brightness.float() / 255.0).view(-1, 1, 1, 1),
                 p.contrast.float().view(-1, 1, 1, 1), p.blur_sigma, p.noise]
    order, n_blurred = None, n
    if on_cpu:
        # Blurred images first, so that the blurred images of a chunk are a leading slice: only
        # those are convolved, without gathering them out of the chunk and scattering them back.
        order = torch.argsort((p.blur_sigma <= 0).to(torch.uint8), stable=True)
        n_blurred = int((p.blur_sigma > 0).sum())
        per_image = [v[order] for v in per_image]
    theta, brightness, contrast, sigma, noisy = per_image
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        x = images[lo:hi] if order is None else images.index_select(0, order[lo:hi])
        x = F.grid_sample(x.float().mul_(brightness[lo:hi]), sampling_grid(theta[lo:hi], out_size),
                          mode="bilinear", padding_mode="zeros", align_corners=False)
        _jitter_and_normalise(x, contrast[lo:hi], mean, std)
        blurred = min(hi, n_blurred) - lo
        if config.blur_kernel > 1 and blurred > 0:
            _grouped_blur(x[:blurred], sigma[lo:hi][:blurred], config.blur_kernel, out=x[:blurred])
        if order is None:
            if add_noise:  # zeros for the images without noise
                x.addcmul_(gaussian_noise(tuple(x.shape), config.noise_std, generator),
                           noisy[lo:hi].float().view(-1, 1, 1, 1))
            out[lo:hi] = x
        else:
            _write_rows(out, order[lo:hi].tolist(), x, noisy[lo:hi].tolist() if add_noise else None,
                        config.noise_std, generator)
    return out


def _write_rows(out: torch.Tensor, rows: list[int], x: torch.Tensor, noisy: list[bool] | None,
                std: float, generator: torch.Generator | None) -> None:
    """``out[rows[i]] = x[i]`` plus noise where ``noisy[i]``: noise is drawn for those images only
    and added while writing, which saves a pass over the chunk."""
    flags = noisy or [False] * len(rows)
    noise = gaussian_noise((sum(flags), *x.shape[1:]), std, generator) if any(flags) else None
    drawn = 0
    for i, row in enumerate(rows):
        if flags[i]:
            torch.add(x[i], noise[drawn], out=out[row])
            drawn += 1
        else:
            out[row] = x[i]


def _jitter_and_normalise(x: torch.Tensor, contrast: torch.Tensor, mean: float = XRAY_MEAN,
                          std: float = XRAY_STD) -> None:
    """In place: clamp the brightened chunk to [0, 1], blend with its mean, normalise.

    ``clamp((x - m) * c + m, 0, 1)`` followed by ``(. - mean) / std`` is one affine map
    and a clamp to the normalised bounds: three passes over the pixels instead of six. Blurring after
    normalising gives the same image, as the blur kernel sums to one.
    """
    x.clamp_(0, 1)
    image_mean = x.mean(dim=(1, 2, 3), keepdim=True)
    offset = ((1 - contrast) * image_mean - mean) / std
    x.mul_(contrast / std).add_(offset)  # measured ~5x faster than one broadcast addcmul
    x.clamp_(-mean / std, (1 - mean) / std)


class BatchAugment:
    """Draws and applies one view per image of a uint8 batch already on the device.

    Pretraining normalises with the X-ray ``mean`` and ``std``; finetuning passes those of its
    evaluation preprocessing, so training and test images are normalised alike.
    """

    def __init__(self, config: AugmentConfig, out_size: int, generator: torch.Generator,
                 mean: float = XRAY_MEAN, std: float = XRAY_STD) -> None:
        self.config = config
        self.out_size = out_size
        self.generator = generator
        self.mean = mean
        self.std = std

    def __call__(self, images: torch.Tensor, out_size: int | None = None,
                 scale: tuple[float, float] | None = None) -> torch.Tensor:
        if images.device != self.generator.device:
            raise ValueError(f"images are on {images.device} but the augmentation generator is on {self.generator.device}")
        p = sample_params(images.shape[0], self.config, self.generator, scale)
        return apply_params(images, p, out_size or self.out_size, self.config, self.generator,
                            mean=self.mean, std=self.std)


def preprocess(images: torch.Tensor, out_size: int, crop_fraction: float = 224 / 256) -> torch.Tensor:
    """Deterministic evaluation view: centre crop ``crop_fraction`` of the side, resize, normalise.

    With the default fraction this is the study's "resize 256, centre crop 224" on a 256 px cache.
    """
    x = to_unit_float(images)
    n = x.shape[0]
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = crop_fraction
    theta[:, 1, 1] = crop_fraction
    grid = F.affine_grid(theta, [n, 1, out_size, out_size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (x - XRAY_MEAN) / XRAY_STD
