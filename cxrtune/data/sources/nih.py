"""NIH ChestX-ray14 from a local folder: the study's pretraining archive.

Layout (as distributed by the NIH Clinical Center, and its Kaggle mirror)::

    ROOT/Data_Entry_2017_v2020.csv   (or Data_Entry_2017.csv; .csv.gz accepted)
    ROOT/train_val_list.txt          optional: the official patient-disjoint split
    ROOT/test_list.txt
    ROOT/images_001/00000001_000.png ... ROOT/images_012/...   (NIH box download)
    ROOT/images_001/images/...                                 (Kaggle mirror)
    ROOT/images/...  or the PNGs directly in ROOT               (also accepted)

Labels are the ``Finding Labels`` field split on ``|``; an image without findings keeps the
label ``No Finding`` (it is a negative for every few-shot task, never a disease itself, by the
``no_finding`` option every source shares; an empty ``Finding Labels`` field means the same).

Splits: with the official lists, images in ``test_list.txt`` are ``test`` and all others
``train`` (``val_from_train`` moves the patients whose md5 hash is 0 mod 5 from ``train`` to
``val``); without them every patient goes to ``train`` or ``val`` by that hash.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pandas as pd

from cxrtune.config import Config, param
from cxrtune.data.index import patient_split, validate_index
from cxrtune.data.sources.base import Source, register_source, require_dir, resolve_missing
from cxrtune.data.sources.files import (
    check_header, locate_csv, plain_options, read_list_file, read_table, scan_folders, subfolders,
)
from cxrtune.errors import DataError

CSV_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
#: Header fields every NIH label CSV has (seed-facts); the size fields below are optional.
REQUIRED_COLUMNS = (
    "Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
    "Patient Gender", "View Position",
)
# The header writes ``OriginalImage[Width,Height]`` unquoted, so a CSV reader sees two fields.
SIZE_COLUMNS = {
    "OriginalImage[Width": "original_width",
    "Height]": "original_height",
    "OriginalImagePixelSpacing[x": "pixel_spacing_x",
    "y]": "pixel_spacing_y",
}
TRAIN_LIST, TEST_LIST = "train_val_list.txt", "test_list.txt"
NO_FINDING = "No Finding"

#: The few-shot protocol on NIH: single-label images, "No Finding" only ever a negative.
TASK_DEFAULTS: dict[str, Any] = {
    "views": None,
    "exclude": (NO_FINDING,),
    "min_train": 15,
    "min_val": 6,
    "force_include": (),
    "max_train_neg": 5000,
    "max_val_neg": 2000,
}


@dataclasses.dataclass
class NihOptions(Config):
    csv: str | None = param(None, doc="label CSV (absolute or relative to root); default: found in root")
    allow_missing: bool = param(False, doc="drop listed images that are not on disk instead of failing")
    assume_present: bool = param(False, doc="index every CSV row without requiring the images (metadata only; "
                                            "an image not found gets an empty path)")
    views: tuple[str, ...] | None = param(None, doc="keep only these View Position values, e.g. PA,AP")
    official_split: bool = param(True, doc="use train_val_list.txt / test_list.txt when present")
    val_from_train: bool = param(False, doc="with the official lists, move md5-hash validation patients to val")


@register_source
class NihSource(Source):
    name = "nih"

    def __init__(self, root=None, **options: Any) -> None:
        self.config = NihOptions.from_dict(plain_options(options))
        super().__init__(root, **self.config.to_dict())
        #: counts from the last :meth:`build_index` (listed, indexed, missing, csv, split lists)
        self.report: dict[str, Any] = {}

    # -- index --------------------------------------------------------------------------------
    def build_index(self) -> pd.DataFrame:
        self.report = {}
        root = require_dir(self.root, "nih")
        csv_path = locate_csv(root, self.config.csv, CSV_NAMES, "nih")
        header = check_header(csv_path, REQUIRED_COLUMNS, "nih")
        text_columns = {c: str for c in ("Image Index", "Finding Labels", "Patient ID", "Patient Gender", "View Position")}
        raw = read_table(csv_path, "nih", dtype=text_columns,
                          usecols=[c for c in header if c in REQUIRED_COLUMNS or c in SIZE_COLUMNS])
        for column in text_columns:
            raw[column] = raw[column].fillna("")
        df = _parse_rows(raw, csv_path.name)
        df["split"] = self._splits(root, df)
        if self.config.views is not None:
            df = df[df["view"].isin(self.config.views)].reset_index(drop=True)
        df = self._attach_paths(root, df, csv_path.name)
        return validate_index(df, "nih")

    def _splits(self, root, df: pd.DataFrame) -> np.ndarray:
        by_hash = _hash_split(df["patient_id"])
        test_file, train_file = root / TEST_LIST, root / TRAIN_LIST
        if not (self.config.official_split and test_file.is_file()):
            self.report["split"] = "md5 patient hash (train/val)"
            return by_hash
        test_ids = set(read_list_file(test_file))
        if train_file.is_file():
            both = test_ids & set(read_list_file(train_file))
            if both:
                raise DataError(
                    f"nih: {len(both)} image(s) are listed in both {TRAIN_LIST} and {TEST_LIST} "
                    f"(e.g. {sorted(both)[0]}); the official lists are disjoint: restore them, or pass "
                    "official_split=False to split patients by hash"
                )
        is_test = np.array([i in test_ids for i in df["image_id"].tolist()], dtype=bool)
        _check_patients_disjoint(df, is_test)
        split = np.where(is_test, "test", "train")
        if self.config.val_from_train:
            split = np.where((split == "train") & (by_hash == "val"), "val", split)
        self.report["split"] = f"official {TEST_LIST}" + (" + md5 val from train" if self.config.val_from_train else "")
        return split

    def _attach_paths(self, root, df: pd.DataFrame, csv_name: str) -> pd.DataFrame:
        folders = [root / "images"]
        numbered = subfolders(root, "images_*")
        folders += numbered + [d / "images" for d in numbered] + [root]
        found = scan_folders(folders)
        ids = df["image_id"].tolist()
        n_missing = sum(i not in found for i in ids)
        self.report.update(listed=len(df), missing=n_missing, csv=csv_name)
        if self.config.assume_present:
            df["path"] = [found.get(i, "") for i in ids]
        else:
            # A missing image keeps its bare name as its path, so the error lists file names.
            df["path"] = [found.get(i, i) for i in ids]
            present = set(found.values())
            df = resolve_missing(
                df, self.config.allow_missing,
                f"nih ({csv_name} in {root}; searched images/, images_*/, images_*/images/ and the root)",
                exists=present.__contains__,
            )
        self.report["indexed"] = len(df)
        return df

    # -- few-shot tasks -----------------------------------------------------------------------
    def task_options(self, index: pd.DataFrame) -> dict[str, Any]:
        """The protocol's arguments for :func:`cxrtune.data.tasks.build_task_pool` on ``index``:
        evaluation on ``val`` when the index has one, else on the official ``test`` split."""
        eval_split = "val" if (index["split"] == "val").any() else "test"
        return {**TASK_DEFAULTS, "eval_splits": (eval_split,)}

    def task_pool(self, index: pd.DataFrame, **overrides: Any):
        return self.build_pool(index, **{**self.task_options(index), **overrides})


def _parse_rows(raw: pd.DataFrame, csv_name: str) -> pd.DataFrame:
    """Vectorised conversion of the NIH columns to the index schema plus extras."""
    image_id = raw["Image Index"].str.strip()
    if (image_id == "").any():
        row = int(np.flatnonzero((image_id == "").to_numpy())[0])
        raise DataError(f"nih: {csv_name} row {row + 1} (line {row + 2}) has an empty Image Index")
    # "00001" and "1" are the same patient in different releases: hash the canonical form.
    patient_text = raw["Patient ID"]
    canonical = {p: (p.strip().lstrip("0") or "0") if p.strip().isdigit() else p.strip() for p in patient_text.unique()}
    label_text = raw["Finding Labels"]
    parsed = {text: [x.strip() for x in text.split("|") if x.strip()] for text in label_text.unique()}
    df = pd.DataFrame({
        "image_id": image_id,
        "patient_id": patient_text.map(canonical),
        "labels": label_text.map(parsed),
        "view": raw["View Position"].str.strip(),
        "age": _integers(raw["Patient Age"]),
        "sex": raw["Patient Gender"].str.strip(),
        "follow_up": _integers(raw["Follow-up #"]),
    })
    for column, name in SIZE_COLUMNS.items():
        if column in raw.columns:
            df[name] = _integers(raw[column]) if name.startswith("original") else pd.to_numeric(raw[column], errors="coerce")
    return df


def _integers(column: pd.Series) -> pd.Series:
    """Integer column with gaps; ages read "058Y" in the very first NIH release."""
    if pd.api.types.is_numeric_dtype(column):
        return column.astype("Int64")
    digits = column.astype(str).str.extract(r"(\d+)", expand=False)
    return pd.to_numeric(digits, errors="coerce").astype("Int64")


def _hash_split(patient_id: pd.Series) -> np.ndarray:
    splits = {p: patient_split(p) for p in patient_id.unique()}
    return patient_id.map(splits).to_numpy()


def _check_patients_disjoint(df: pd.DataFrame, is_test: np.ndarray) -> None:
    patients = df["patient_id"].tolist()
    test_patients = {p for p, t in zip(patients, is_test) if t}
    crossing = df.loc[~is_test & np.array([p in test_patients for p in patients], dtype=bool)]
    if len(crossing):
        pid = crossing["patient_id"].iloc[0]
        in_test = df.loc[is_test & (df["patient_id"] == pid), "image_id"].iloc[0]
        raise DataError(
            f"nih: patient {pid!r} has images in {TEST_LIST} (e.g. {in_test}) and outside it "
            f"(e.g. {crossing['image_id'].iloc[0]}); the official lists are patient-disjoint: "
            "restore the official files, or pass official_split=False to split patients by hash"
        )
