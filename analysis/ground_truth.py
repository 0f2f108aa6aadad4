"""Where each finding really is, at the image cache's resolution.

- phantom caches store every finding's mask (``masks.bits``, read by
  :func:`cxrtune.data.sources.phantom.load_masks`);
- NIH ChestX-ray14 ships boxes for 984 images in ``BBox_List_2017.csv`` (columns ``Image Index,
  Finding Label, Bbox [x, y, w, h]`` in original pixels); they are mapped through the cache's
  square fit (centre crop, letterbox or squash of the original ``width x height``) to the cache;
- any other index with a ``boxes`` column (flat normalised ``x0, y0, x1, y1`` per box) is used as is.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from cxrtune.analysis.localisation import boxes_to_mask
from cxrtune.errors import DataError

BBOX_FILE = "BBox_List_2017.csv"
#: BBox_List_2017 names one finding differently from Data_Entry_2017's labels.
NIH_BOX_LABELS = {"Infiltrate": "Infiltration"}
NIH_SIDE = 1024  # every ChestX-ray14 image is 1024 x 1024 unless the index says otherwise


def read_nih_boxes(path: str | Path) -> pd.DataFrame:
    """``image_id, finding, x, y, w, h`` (original pixels) from BBox_List_2017.csv.

    The file's header is ``Bbox [x,y,w,h]`` unquoted (a CSV reader sees four fields, then empty
    ones), so the box is read from the third to sixth columns by position."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"NIH box file {path} does not exist: it is {BBOX_FILE} of the ChestX-ray14 download")
    raw = pd.read_csv(path)
    if len(raw.columns) < 6 or raw.columns[0].strip() != "Image Index" or raw.columns[1].strip() != "Finding Label":
        raise DataError(f"{path}: expected columns 'Image Index, Finding Label, Bbox [x,y,w,h]', got "
                        f"{list(raw.columns[:6])}")
    boxes = pd.DataFrame({"image_id": raw.iloc[:, 0].astype(str).str.strip(),
                          "finding": raw.iloc[:, 1].astype(str).str.strip().replace(NIH_BOX_LABELS)})
    for k, name in enumerate(("x", "y", "w", "h")):
        boxes[name] = pd.to_numeric(raw.iloc[:, 2 + k], errors="coerce")
    bad = boxes[["x", "y", "w", "h"]].isna().any(axis=1) | (boxes["w"] <= 0) | (boxes["h"] <= 0)
    if bad.any():
        raise DataError(f"{path}: row {int(np.flatnonzero(bad.to_numpy())[0]) + 2} has a missing or empty box")
    return boxes


def to_cache_box(x: float, y: float, w: float, h: float, width: float, height: float, fit: str = "crop"
                 ) -> tuple[float, float, float, float]:
    """An original-pixel box as normalised (x0, y0, x1, y1) of the cached square, clipped to it.

    ``crop`` keeps the centred ``min(width, height)`` square, ``pad`` centres the image in a
    ``max`` square, ``squash`` scales each axis (cxrtune.data.imageio's fits)."""
    if fit == "squash":
        sx, sy, ox, oy = width, height, 0.0, 0.0
    else:
        side = min(width, height) if fit == "crop" else max(width, height)
        sx = sy = side
        ox, oy = (width - side) / 2, (height - side) / 2
    x0, x1 = (x - ox) / sx, (x + w - ox) / sx
    y0, y1 = (y - oy) / sy, (y + h - oy) / sy
    return tuple(float(np.clip(v, 0.0, 1.0)) for v in (x0, y0, x1, y1))


def nih_box_masks(index: pd.DataFrame, boxes: pd.DataFrame, size: int, fit: str = "crop") -> dict[tuple[str, str], np.ndarray]:
    """(image_id, finding) -> mask at the cache side for every box of an image in ``index``."""
    sizes = index.set_index("image_id")
    out: dict[tuple[str, str], list] = {}
    for rec in boxes.itertuples(index=False):
        if rec.image_id not in sizes.index:
            continue
        row = sizes.loc[rec.image_id]
        width = float(row["original_width"]) if "original_width" in sizes.columns and not pd.isna(row["original_width"]) else NIH_SIDE
        height = float(row["original_height"]) if "original_height" in sizes.columns and not pd.isna(row["original_height"]) else NIH_SIDE
        box = to_cache_box(rec.x, rec.y, rec.w, rec.h, width, height, fit)
        if box[2] <= box[0] or box[3] <= box[1]:
            continue  # the box lies in the part the crop removed
        out.setdefault((rec.image_id, rec.finding), []).append(box)
    return {key: boxes_to_mask(bxs, size) for key, bxs in out.items()}


class GroundTruth:
    """Masks of (image, finding) at a cache's resolution, from whichever source the cache has."""

    def __init__(self, cache, boxes_csv: str | Path | None = None) -> None:
        self.cache = cache
        self.size = int(cache.size)
        self.kind = "none"
        self._box_masks: dict[tuple[str, str], np.ndarray] = {}
        index = cache.index
        if (Path(cache.path) / "masks.bits").is_file():
            self.kind = "phantom masks"
        elif boxes_csv is not None:
            self._box_masks = nih_box_masks(index, read_nih_boxes(boxes_csv), self.size, getattr(cache, "fit", "crop"))
            self.kind = f"{BBOX_FILE} boxes"
        elif "boxes" in index.columns:
            self.kind = "index boxes"
        self._rows = dict(zip(index["image_id"].astype(str), index["cache_row"].astype(int)))
        self._index = index.set_index("image_id")

    def available(self) -> bool:
        return self.kind != "none"

    def mask(self, image_id: str, finding: str) -> np.ndarray | None:
        """The region of ``finding`` in ``image_id`` (bool S x S), or None where none is known."""
        if self.kind == "phantom masks":
            from cxrtune.data.sources.phantom import load_masks

            mask = load_masks(self.cache, np.array([self._rows[image_id]]))[0]
            return mask if mask.any() else None
        if self._box_masks:
            return self._box_masks.get((image_id, finding))
        if self.kind == "index boxes":
            flat = self._index.loc[image_id, "boxes"]
            flat = [] if flat is None else list(flat)
            if not flat or any(isinstance(v, float) and math.isnan(v) for v in flat):
                return None
            return boxes_to_mask([flat[i: i + 4] for i in range(0, len(flat), 4)], self.size)
        return None
