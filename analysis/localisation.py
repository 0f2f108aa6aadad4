"""Does the backbone look at the right place? Two scores of a heatmap against a ground-truth region.

- **Pointing game** (Zhang et al., "Top-down neural attention by excitation backprop", 2016): a hit
  when the heatmap's maximum falls inside the region. Ties at the maximum count as a hit if any
  maximal pixel is inside (a flat heatmap, e.g. of a dead backbone, is then a hit only where the
  region covers a maximum; see ``energy_inside`` for the graded score).
- **Energy inside**: the share of the (non-negative) heatmap's total inside the region; a uniform
  heatmap scores the region's area fraction, which the report prints beside it as chance level.

Regions are boolean masks at the heatmap's resolution: the phantom's stored masks, or boxes (NIH
BBox_List_2017, or the index's boxes) drawn by :func:`boxes_to_mask`. Per (finding, backbone), the
hit rate and the mean energy share come with percentile-bootstrap 95 % CIs over the images.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from cxrtune.errors import DataError
from cxrtune.evaluate.stats import bootstrap_ci


def _check(heatmap: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    heatmap = np.asarray(heatmap, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if heatmap.ndim != 2 or heatmap.shape != mask.shape:
        raise DataError(f"heatmap {heatmap.shape} and mask {mask.shape} must be 2-d and of the same shape")
    if not mask.any():
        raise DataError("mask is empty: a localisation score needs a ground-truth region")
    if not np.isfinite(heatmap).all():
        raise DataError("heatmap holds NaN or inf")
    return heatmap, mask


def pointing_hit(heatmap: np.ndarray, mask: np.ndarray) -> bool:
    """True when a maximum of ``heatmap`` lies inside ``mask``."""
    heatmap, mask = _check(heatmap, mask)
    return bool(mask[heatmap == heatmap.max()].any())


def energy_inside(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """Share of the heatmap's (clipped at 0) total inside ``mask``; the area fraction when all zero."""
    heatmap, mask = _check(heatmap, mask)
    positive = np.clip(heatmap, 0, None)
    total = positive.sum()
    if total == 0:
        return float(mask.mean())
    return float(positive[mask].sum() / total)


def boxes_to_mask(boxes: Iterable[Sequence[float]], size: int, normalised: bool = True) -> np.ndarray:
    """Union of boxes ``(x0, y0, x1, y1)`` as a (size, size) mask; normalised to [0, 1] or in pixels.
    A box covers every pixel whose centre lies inside it (at least one pixel per box)."""
    mask = np.zeros((size, size), dtype=bool)
    for box in boxes:
        x0, y0, x1, y1 = (float(v) * (size if normalised else 1.0) for v in box)
        if not (x1 > x0 and y1 > y0):
            raise DataError(f"box {tuple(box)} is empty or inverted: expected x0 < x1 and y0 < y1")
        c0, c1 = int(np.clip(np.ceil(x0 - 0.5), 0, size - 1)), int(np.clip(np.ceil(x1 - 0.5), 1, size))
        r0, r1 = int(np.clip(np.ceil(y0 - 0.5), 0, size - 1)), int(np.clip(np.ceil(y1 - 0.5), 1, size))
        mask[r0:max(r1, r0 + 1), c0:max(c1, c0 + 1)] = True
    return mask


def score_images(heatmaps: np.ndarray, masks: np.ndarray) -> pd.DataFrame:
    """Per image: ``hit`` (pointing game), ``energy`` (share inside) and ``area`` (chance level)."""
    return pd.DataFrame([{"hit": pointing_hit(h, m), "energy": energy_inside(h, m), "area": float(np.mean(m))}
                         for h, m in zip(heatmaps, masks)])


def summarise_scores(scores: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Per (finding, backbone) of a table with columns finding, backbone, hit, energy, area:
    images, hit_rate with CI, energy share with CI, and the mean area (chance)."""
    rows = []
    for (finding, backbone), part in scores.groupby(["finding", "backbone"], sort=True):
        hits = part["hit"].astype(float).to_numpy()
        energy = part["energy"].to_numpy()
        hit_low, hit_high = bootstrap_ci(hits, seed=seed)
        e_low, e_high = bootstrap_ci(energy, seed=seed)
        rows.append({"finding": finding, "backbone": backbone, "images": int(len(part)),
                     "hit_rate": float(hits.mean()), "hit_ci_low": hit_low, "hit_ci_high": hit_high,
                     "energy": float(energy.mean()), "energy_ci_low": e_low, "energy_ci_high": e_high,
                     "chance": float(part["area"].mean())})
    return pd.DataFrame(rows)
