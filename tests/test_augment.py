"""Batched per-image augmentation: identity, geometry, photometry against torchvision, independence."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torchvision.transforms.functional as TF

from cxrtune.augment import (XRAY_MEAN, XRAY_STD, AugmentConfig, BatchAugment, ViewParams, apply_params,
                             blur, preprocess, sample_params)
from cxrtune.errors import ConfigError

NO_NOISE = AugmentConfig(noise_std=0.0)


def _images(n=4, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size), generator=g, dtype=torch.uint8)


def _unnormalise(x):
    return x * XRAY_STD + XRAY_MEAN


def test_identity_parameters_reproduce_the_input():
    images = _images()
    out = apply_params(images, ViewParams.identity(4), 16, NO_NOISE)
    assert out.shape == (4, 1, 16, 16)
    assert torch.allclose(_unnormalise(out)[:, 0], images.float() / 255, atol=1e-5)


def test_flip_crop_and_rotation_are_exact_on_the_pixel_grid():
    images = _images(n=2, size=8)
    unit = images.float() / 255
    p = ViewParams.identity(2)
    p.flip = torch.tensor([True, False])
    out = _unnormalise(apply_params(images, p, 8, NO_NOISE))[:, 0]
    assert torch.allclose(out[0], unit[0].flip(-1), atol=1e-5)
    assert torch.allclose(out[1], unit[1], atol=1e-5)
    # Top-left quarter at half the size is exactly that block.
    p = ViewParams.identity(2)
    p.crop_w, p.crop_h = torch.full((2,), 0.5), torch.full((2,), 0.5)
    p.center_x, p.center_y = torch.full((2,), -0.5), torch.full((2,), -0.5)
    out = _unnormalise(apply_params(images, p, 4, NO_NOISE))[:, 0]
    assert torch.allclose(out, unit[:, :4, :4], atol=1e-5)
    # A 90 degree rotation is a rot90 of the image (one direction or the other).
    p = ViewParams.identity(2)
    p.angle = torch.full((2,), torch.pi / 2)
    out = _unnormalise(apply_params(images, p, 8, NO_NOISE))[:, 0]
    assert any(torch.allclose(out, torch.rot90(unit, k, dims=(1, 2)), atol=1e-5) for k in (1, -1))


def test_brightness_contrast_and_blur_match_torchvision_per_image():
    images = _images(n=3, size=16, seed=1)
    unit = images.float().unsqueeze(1) / 255
    p = ViewParams.identity(3)
    p.brightness = torch.tensor([0.5, 1.0, 1.6])
    p.contrast = torch.tensor([1.7, 0.3, 1.0])
    p.blur_sigma = torch.tensor([0.0, 1.3, 0.6])
    out = _unnormalise(apply_params(images, p, 16, NO_NOISE))
    for i in range(3):
        want = TF.adjust_contrast(TF.adjust_brightness(unit[i], p.brightness[i].item()), p.contrast[i].item())
        if p.blur_sigma[i] > 0:
            want = TF.gaussian_blur(want, [9, 9], [p.blur_sigma[i].item()] * 2)
        assert torch.allclose(out[i], want, atol=1e-5), i


def test_blur_with_zero_sigma_is_identity():
    x = torch.rand(2, 1, 12, 12)
    assert torch.equal(blur(x, torch.zeros(2), 9), x)


def test_parameters_and_views_differ_per_image():
    g = torch.Generator().manual_seed(0)
    p = sample_params(256, AugmentConfig(), g)
    assert p.angle.unique().numel() == 256 and (p.crop_w * p.crop_h).unique().numel() > 200
    assert 0.4 < p.flip.float().mean() < 0.6
    assert 0.7 < (p.brightness != 1).float().mean() < 0.9
    assert 0.4 < (p.blur_sigma > 0).float().mean() < 0.6
    area = p.crop_w * p.crop_h
    assert area.min() >= 0.08 - 1e-6 and area.max() <= 1 + 1e-6
    # The same image repeated gives different views (not one draw for the batch).
    same = _images(n=1, size=32).repeat(8, 1, 1)
    views = BatchAugment(AugmentConfig(), 24, torch.Generator().manual_seed(1))(same)
    flat = views.flatten(1)
    assert all(not torch.allclose(flat[0], flat[i]) for i in range(1, 8))


def test_seeded_generator_reproduces_views_and_noise_has_its_std():
    images = _images(n=4, size=32)
    a = BatchAugment(AugmentConfig(), 32, torch.Generator().manual_seed(5))(images)
    b = BatchAugment(AugmentConfig(), 32, torch.Generator().manual_seed(5))(images)
    assert torch.equal(a, b)
    clean_cfg = dataclasses.replace(NO_NOISE, noise_std=0.0)
    p = ViewParams.identity(4)
    p.noise = torch.ones(4, dtype=torch.bool)
    noisy = apply_params(images, p, 32, AugmentConfig(noise_std=0.1), torch.Generator().manual_seed(0))
    clean = apply_params(images, p, 32, clean_cfg)
    assert (noisy - clean).std().item() == pytest.approx(0.1, rel=0.05)


def test_preprocess_is_a_centre_crop_and_bad_input_is_refused():
    images = _images(n=2, size=16)
    out = _unnormalise(preprocess(images, 8, crop_fraction=0.5))[:, 0]
    assert torch.allclose(out, images[:, 4:12, 4:12].float() / 255, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        preprocess(images.float(), 8)
    with pytest.raises(ConfigError, match="blur_kernel"):
        AugmentConfig(blur_kernel=4)


def test_sampling_grid_equals_affine_grid():
    import torch.nn.functional as F

    from cxrtune.augment import affine_matrices, sampling_grid

    theta = affine_matrices(sample_params(5, AugmentConfig(), torch.Generator().manual_seed(3)))
    want = F.affine_grid(theta, [5, 1, 12, 12], align_corners=False)
    assert torch.allclose(sampling_grid(theta, 12), want, atol=1e-6)


def test_cpu_noise_is_a_gaussian_with_its_std_in_every_image():
    from scipy import stats

    from cxrtune.augment import gaussian_noise

    noise = gaussian_noise((16, 1, 64, 64), 0.1, torch.Generator().manual_seed(0)).double()
    per_image = noise.flatten(1)
    assert torch.allclose(per_image.std(dim=1), torch.full((16,), 0.1, dtype=torch.float64), rtol=0.05)
    assert per_image.mean(dim=1).abs().max() < 0.1 * 4 / 64  # 4 standard errors
    z = (noise.flatten() / 0.1).numpy()
    assert stats.kstest(z, "norm").pvalue > 0.01
    assert stats.normaltest(z).pvalue > 0.01  # skewness and kurtosis of a normal
    # Independent between neighbouring pixels and between images.
    assert abs(torch.corrcoef(torch.stack([noise[..., 1:].flatten(), noise[..., :-1].flatten()]))[0, 1]) < 0.02
    assert torch.corrcoef(per_image).fill_diagonal_(0).abs().max() < 0.06


def test_normal_table_holds_each_slice_mean_of_the_normal():
    from scipy import stats

    from cxrtune.augment import normal_table

    table = normal_table().double().numpy()
    n = table.size
    assert (table[1:] > table[:-1]).all() and abs(table.mean()) < 1e-7 and abs(table.var() - 1) < 1e-6
    # Slice i is [ppf(i/n), ppf((i+1)/n)]; its mean, by the density, is n * (pdf(lo) - pdf(hi)).
    for i in (0, 1, 1000, n // 2 - 1, n // 2, 50000, n - 1):
        lo, hi = stats.norm.ppf(i / n), stats.norm.ppf((i + 1) / n)
        assert lo <= table[i] <= hi or (abs(table[i]) > 4 and lo <= table[i] * (1 - 1e-4) <= hi), i
        assert table[i] == pytest.approx(n * (stats.norm.pdf(lo) - stats.norm.pdf(hi)), rel=1e-4, abs=1e-6)


def test_noise_goes_only_to_the_images_drawn_for_it():
    images = _images(n=6, size=32)
    p = sample_params(6, AugmentConfig(), torch.Generator().manual_seed(2))
    p.noise = torch.tensor([True, False, True, False, False, True])
    noisy = apply_params(images, p, 24, AugmentConfig(noise_std=0.2), torch.Generator().manual_seed(0))
    clean = apply_params(images, p, 24, NO_NOISE)
    assert torch.equal(noisy[~p.noise], clean[~p.noise])
    assert (noisy - clean)[p.noise].std().item() == pytest.approx(0.2, rel=0.1)
    # Each image gets its own noise, also within one chunk.
    same = ViewParams.identity(6)
    same.noise = torch.ones(6, dtype=torch.bool)
    repeated = images[:1].repeat(6, 1, 1)
    added = (apply_params(repeated, same, 32, AugmentConfig(), torch.Generator().manual_seed(1))
             - apply_params(repeated, same, 32, NO_NOISE)).flatten(1)
    assert torch.corrcoef(added).fill_diagonal_(0).abs().max() < 0.1


def test_views_do_not_depend_on_chunking_or_on_the_other_images():
    # On CPU the blurred images of a batch are processed first: the order must not leak into results.
    images = _images(n=11, size=32, seed=4)
    p = sample_params(11, AugmentConfig(), torch.Generator().manual_seed(6))
    assert 0 < (p.blur_sigma > 0).sum() < 11
    whole = apply_params(images, p, 24, NO_NOISE)
    for chunk in (1, 3, 8, 64):
        assert torch.allclose(apply_params(images, p, 24, NO_NOISE, chunk=chunk), whole, atol=1e-6), chunk
    for i in range(11):
        alone = ViewParams(**{k: v[i:i + 1] for k, v in vars(p).items()})
        assert torch.allclose(apply_params(images[i:i + 1], alone, 24, NO_NOISE), whole[i:i + 1], atol=1e-6), i


def test_blur_matches_torchvision_on_non_square_images():
    x = torch.rand(4, 1, 12, 20, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.7, 0.0, 1.9, 1.2])
    out = blur(x, sigma, 9)
    for i in range(4):
        want = TF.gaussian_blur(x[i], [9, 9], [sigma[i].item()] * 2) if sigma[i] > 0 else x[i]
        assert torch.allclose(out[i], want, atol=1e-6), i


def test_views_normalise_with_the_mean_and_std_given():
    images = _images()
    out = apply_params(images, ViewParams.identity(4), 16, NO_NOISE, mean=0.25, std=0.5)
    assert torch.allclose(out[:, 0], (images.float() / 255 - 0.25) / 0.5, atol=1e-5)
    p = sample_params(4, AugmentConfig(), torch.Generator().manual_seed(2))
    default = apply_params(images, p, 12, NO_NOISE)
    own = apply_params(images, p, 12, NO_NOISE, mean=0.25, std=0.5)
    # the same views in other units: only the normalisation differs
    assert torch.allclose(own * 0.5 + 0.25, default * XRAY_STD + XRAY_MEAN, atol=1e-5)
