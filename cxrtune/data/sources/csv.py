"""A user's own archive, described by one CSV.

Minimal file (``ROOT/labels.csv``; the header names are configurable)::

    path,labels,patient_id
    scans/a.png,Hernia|Fibrosis,P001
    scans/b.png,No Finding,P002

- ``path``: the image, absolute or relative to ``image_root`` (default: the root folder, or the
  CSV's folder when ``root`` is the CSV itself);
- ``labels``: labels joined by ``label_sep`` (``|``); an empty cell, ``NaN`` and ``No Finding``
  mean "no finding": such images are negatives for every few-shot task, never a task (the
  ``no_finding`` option every source takes lists those words; see :mod:`cxrtune.data.tasks`);
- ``patient_id``: splits never cut a patient in two.

Optional columns: ``image_id`` (default: the path as written in the CSV), ``view`` (default
``default_view``, ``PA``) and ``split`` (train/val/test; default: the md5 patient rule). Any other
column is kept in the index.

One-hot listings such as CheXpert's (one column per finding holding 1, 0, -1 or nothing) are read
with ``label_columns`` (each column whose value is 1 becomes a label; -1, "uncertain", counts as
``uncertain_as``), ``path_column``, ``view_column`` and ``patient_pattern`` (a regular expression
that finds the patient id in the path). CheXpert's ``train.csv``, from the folder that holds
``CheXpert-v1.0-small/``::

    make_source("csv", root, csv="CheXpert-v1.0-small/train.csv", path_column="Path",
                label_columns=CHEXPERT_LABELS, patient_pattern=r"(patient\\d+)",
                view_column="AP/PA", default_view="L")   # AP/PA is blank on lateral films
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrtune.config import Config, param
from cxrtune.data.index import SPLITS, patient_split, validate_index
from cxrtune.data.sources.base import Source, register_source, resolve_missing, resolve_path
from cxrtune.data.sources.files import check_header, existing_files, link_loop, plain_options, read_table
from cxrtune.errors import DataError

DEFAULT_CSV_NAME = "labels.csv"
#: The one-hot finding columns of CheXpert's train.csv / valid.csv.
CHEXPERT_LABELS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)


@dataclasses.dataclass
class CsvOptions(Config):
    csv: str | None = param(None, doc="the CSV (absolute or relative to root); default: root/labels.csv, or root itself")
    label_sep: str = param("|", doc="separator between labels in the labels column")
    image_root: str | None = param(None, doc="folder that relative image paths start from; default: root")
    allow_missing: bool = param(False, doc="drop listed images that are not on disk instead of failing")
    assume_present: bool = param(False, doc="index every row without requiring the images (metadata only)")
    default_view: str = param("PA", doc="view of rows without a view value")
    views: tuple[str, ...] | None = param(None, doc="keep only these views")
    path_column: str = param("path", doc="column holding the image path")
    labels_column: str = param("labels", doc="column holding the joined labels")
    patient_column: str = param("patient_id", doc="column holding the patient id")
    patient_pattern: str | None = param(None, doc="regex finding the patient id in the path, if no patient column")
    view_column: str = param("view", doc="column holding the view (optional)")
    label_columns: tuple[str, ...] | None = param(None, doc="one-hot label columns (CheXpert style) instead of labels")
    uncertain_as: str = param("negative", choices=("negative", "positive"), doc="meaning of -1 in label_columns")


@register_source
class CsvSource(Source):
    name = "csv"

    def __init__(self, root=None, **options: Any) -> None:
        self.config = CsvOptions.from_dict(plain_options(options))
        super().__init__(root, **self.config.to_dict())
        if self.config.patient_pattern is not None:
            try:
                self._patient_re = re.compile(self.config.patient_pattern)
            except re.error as exc:
                raise DataError(f"csv: patient_pattern = {self.config.patient_pattern!r} is not a valid "
                                f"regular expression ({exc})") from None
        #: counts from the last :meth:`build_index` (listed, indexed, missing, csv)
        self.report: dict[str, Any] = {}

    def csv_path(self) -> Path:
        if self.root is not None and not self.root.exists():
            raise DataError(f"csv: root {self.root} does not exist; pass the folder holding the images and labels.csv")
        explicit = self.config.csv
        if explicit:
            path = Path(explicit).expanduser()
            if not path.is_absolute() and self.root is not None:
                path = self.root / path
        elif self.root is not None and self.root.is_file():
            path = self.root
        elif self.root is not None:
            path = self.root / DEFAULT_CSV_NAME
        else:
            raise DataError("csv: no CSV given; pass --root FOLDER (holding labels.csv) or csv=PATH")
        if not path.is_file():
            if link_loop(path):
                raise DataError(f"csv: the label CSV {path} is a symbolic link loop (following it leads back "
                                "to itself); point csv= at the real file")
            raise DataError(f"csv: the label CSV {path} does not exist; pass csv=PATH or put {DEFAULT_CSV_NAME} in the root folder")
        return resolve_path(path, "csv: the label CSV")

    def image_base(self, csv_path: Path) -> Path:
        if self.config.image_root:
            return resolve_path(self.config.image_root, "csv: image_root")
        if self.root is not None and self.root.is_dir():
            return self.root
        return csv_path.parent

    def build_index(self) -> pd.DataFrame:
        self.report = {}
        cfg = self.config
        csv_path = self.csv_path()
        required = [cfg.path_column]
        required += list(cfg.label_columns) if cfg.label_columns else [cfg.labels_column]
        if cfg.patient_pattern is None:
            required.append(cfg.patient_column)
        header = check_header(csv_path, required, "csv")
        raw = read_table(csv_path, "csv", dtype=str, keep_default_na=False)
        what = f"csv ({csv_path})"

        written = raw[cfg.path_column].str.strip()
        _refuse_empty(written, cfg.path_column, what)
        base = self.image_base(csv_path)
        prefix = str(base) + os.sep
        paths = [p if os.path.isabs(p) else _joined(prefix, p) for p in written.tolist()]

        df = pd.DataFrame({
            "image_id": raw["image_id"].str.strip() if "image_id" in header else written.str.replace("\\", "/"),
            "patient_id": self._patients(raw, written, what),
            "labels": self._labels(raw, what),
            "view": _views(raw, cfg.view_column, cfg.default_view),
            "path": paths,
        })
        df["split"] = self._splits(raw, df["patient_id"], header, what)
        ours = {"image_id", "split", cfg.path_column, cfg.labels_column, cfg.patient_column, cfg.view_column}
        ours |= set(cfg.label_columns or ())
        for column in header:
            if column not in ours and column not in df.columns and column.strip():
                df[column] = raw[column]
        if cfg.views is not None:
            df = df[df["view"].isin(cfg.views)].reset_index(drop=True)
        self.report.update(listed=len(df), csv=str(csv_path))
        if not cfg.assume_present:
            present = existing_files(df["path"])
            self.report["missing"] = int(len(df) - sum(present))
            exists = dict(zip(df["path"], present))
            df = resolve_missing(df, cfg.allow_missing, what, exists=exists.__getitem__)
        self.report["indexed"] = len(df)
        return validate_index(df, what)

    # -- columns ----------------------------------------------------------------------------
    def _patients(self, raw: pd.DataFrame, written: pd.Series, what: str) -> pd.Series:
        cfg = self.config
        if cfg.patient_pattern is None:
            patients = raw[cfg.patient_column].str.strip()
            _refuse_empty(patients, cfg.patient_column, what)
            return patients
        found = [self._patient_re.search(p) for p in written]
        bad = [i for i, m in enumerate(found) if m is None]
        if bad:
            raise DataError(
                f"{what}: patient_pattern {cfg.patient_pattern!r} finds no patient id in the path of row "
                f"{bad[0] + 1}: {written.iloc[bad[0]]!r}"
            )
        return pd.Series([m.group(1) if m.groups() else m.group(0) for m in found], index=raw.index)

    def _labels(self, raw: pd.DataFrame, what: str) -> pd.Series:
        cfg = self.config
        if not cfg.label_columns:
            sep = cfg.label_sep
            text = raw[cfg.labels_column]
            parsed = {t: list(dict.fromkeys(x.strip() for x in t.split(sep) if x.strip())) for t in text.unique()}
            return text.map(parsed)
        positive = {"1", "1.0"} | ({"-1", "-1.0"} if cfg.uncertain_as == "positive" else set())
        known = {"", "0", "0.0", "1", "1.0", "-1", "-1.0"}
        hits = []
        for column in cfg.label_columns:
            values = raw[column].str.strip()
            odd = ~values.isin(known)
            if odd.any():
                row = int(np.flatnonzero(odd.to_numpy())[0])
                raise DataError(
                    f"{what}: label column {column!r} holds {values.iloc[row]!r} in row {row + 1}; "
                    "one-hot label columns take 1 (present), 0 (absent), -1 (uncertain) or nothing"
                )
            hits.append(values.isin(positive).to_numpy())
        # One integer per row (bit j = column j); decode each distinct combination once.
        wide = len(hits) >= 63  # beyond int64: Python integers
        codes = sum((hit.astype(object) if wide else hit.astype(np.int64)) * (1 << j) for j, hit in enumerate(hits))
        codes = codes.tolist()
        names = list(cfg.label_columns)
        decoded = {code: [names[j] for j in range(len(names)) if code >> j & 1] for code in set(codes)}
        return pd.Series([decoded[c] for c in codes], index=raw.index)

    def _splits(self, raw: pd.DataFrame, patients: pd.Series, header: list[str], what: str) -> pd.Series:
        if "split" in header:
            split = raw["split"].str.strip().str.lower()
            bad = sorted(set(split) - set(SPLITS))
            if bad:
                raise DataError(f"{what}: split value(s) {bad} are not valid: use {', '.join(SPLITS)}")
            return split
        by_patient = {p: patient_split(p) for p in patients.unique()}
        return patients.map(by_patient)


def _joined(prefix: str, relative: str) -> str:
    path = prefix + relative
    # normpath only where "." / ".." segments or doubled separators could occur (rare, and slow)
    return os.path.normpath(path) if "/." in "/" + relative or "//" in relative else path


def _views(raw: pd.DataFrame, column: str, default: str) -> pd.Series:
    if column not in raw.columns:
        return pd.Series([default] * len(raw), index=raw.index, dtype=str)
    views = raw[column].str.strip()
    return views.where(views != "", default)


def _refuse_empty(values: pd.Series, column: str, what: str) -> None:
    empty = (values == "").to_numpy()
    if empty.any():
        row = int(np.flatnonzero(empty)[0])
        raise DataError(f"{what}: column {column!r} is empty in row {row + 1} (line {row + 2}); every row needs one")
