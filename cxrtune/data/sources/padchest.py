"""PadChest from a local folder: the study's evaluation archive and its rare-disease tasks.

Layout (as distributed by BIMCV; the images come as numbered zip files)::

    ROOT/PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv   (.csv.gz accepted)
    ROOT/<ImageDir>/<ImageID>      e.g. ROOT/0/20536686640136348236148679891455886468_k6ga29.png
    ROOT/<ImageID>                 (all images in one folder also works)

``Labels`` holds a Python list literal per row (``"['pneumonia', ' pleural effusion']"``).
The index's ``labels`` are its entries stripped, with empty strings and repeats dropped, so
``['']`` is an image without label. ``label_entries`` keeps the number of list entries as
written: the study counted those, so for its tasks ``['bronchiectasis', '']`` (two entries) is
not a single-label image and a row whose one entry is empty is skipped. Counting this way
reproduces the study's published train/val positives of all ten diseases exactly on the 18
``ImageDir`` folders 0, 3, 9, 13, 15, 16, 20-23, 25, 27, 29, 35, 37, 39, 49 and 54 (58,324
images; the study had 58,337, and no other set of folders, bar adding the one-image folder 50,
matches its counts), and counting distinct labels does not. ``single_label="labels"`` counts distinct labels instead.

Missing images: the archive's 160,861 images come as one zip file per ``ImageDir`` folder, and
most users, the reference study included (58,337 images), hold a subset. ``allow_missing`` therefore defaults to
True here: the index holds the listed images found on disk and :attr:`PadchestSource.report`
says how many were missing. Finding none at all is still an error (a wrong root, most likely).
``assume_present=True`` indexes every row without looking at the disk: the task protocol on the
full label file needs no pixels.

Tasks (:meth:`PadchestSource.task_pool`) follow the study: PA and AP projections (``AP_horizontal``
is the supine bedside film, a different acquisition, and is left out unless asked for; the study's
counts are only reproduced without it), single label, the exclusion list in
``cxrtune/data/resources/padchest_exclusions.txt``, patients split by md5 hash, at least 15
training and 6 validation positives, "pulmonary fibrosis" forced in, and negatives capped at
5,000 / 2,000.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import logging
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from cxrtune.config import Config, param
from cxrtune.data.index import patient_split, validate_index
from cxrtune.data.sources.base import Source, register_source, require_dir, resolve_missing
from cxrtune.data.sources.files import check_header, locate_csv, plain_options, read_table, scan_folders
from cxrtune.errors import DataError

CSV_NAMES = ("PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv",)
REQUIRED_COLUMNS = ("ImageID", "ImageDir", "PatientID", "Projection", "Labels")
#: Optional CSV fields kept in the index, under these names.
EXTRA_COLUMNS = {
    "StudyID": "study_id",
    "StudyDate_DICOM": "study_date",
    "PatientBirth": "birth_year",
    "PatientSex_DICOM": "sex",
    "MethodLabel": "label_method",  # "Physician" (hand-labelled) or "RNN_model" (text-mined)
    "Rows_DICOM": "original_height",
    "Columns_DICOM": "original_width",
}
log = logging.getLogger(__name__)
DEFAULT_EXCLUSIONS = Path(__file__).resolve().parents[1] / "resources" / "padchest_exclusions.txt"
_MAX_LITERAL_CHARS = 20_000

SINGLE_LABEL_RULES = ("entries", "labels")
#: The study's protocol; ``exclude`` comes from the exclusion file.
TASK_DEFAULTS: dict[str, Any] = {
    "views": ("PA", "AP"),
    "min_train": 15,
    "min_val": 6,
    "force_include": ("pulmonary fibrosis",),
    "max_train_neg": 5000,
    "max_val_neg": 2000,
    "eval_splits": ("val",),
}


@dataclasses.dataclass
class PadchestOptions(Config):
    csv: str | None = param(None, doc="label CSV (absolute or relative to root); default: found in root")
    allow_missing: bool = param(True, doc="index the listed images found on disk (most copies are partial)")
    assume_present: bool = param(False, doc="index every CSV row without requiring the images (metadata only)")
    views: tuple[str, ...] | None = param(None, doc="keep only these Projection values in the index, e.g. PA,AP")
    exclusions: str | None = param(None, doc="exclusion list replacing the built-in one (one label per line)")
    single_label: str = param(
        "entries", choices=SINGLE_LABEL_RULES,
        doc="tasks use images whose Labels list has one entry (entries, the study's count: ['x', ''] "
            "is two) or one distinct non-empty label (labels)",
    )


# -- labels -------------------------------------------------------------------------------------
def parse_label_entries(text: Any) -> list[str]:
    """One ``Labels`` cell to its list entries, stripped, empty strings and repeats kept; raises
    ``ValueError`` when it is not a list of strings. Empty cells and NaN mean no entry."""
    if text is None or (isinstance(text, float) and np.isnan(text)):
        return []
    text = str(text).strip()
    if not text or text.lower() == "nan":
        return []
    if len(text) > _MAX_LITERAL_CHARS:
        raise ValueError(f"{len(text)} characters is too long for a label list")
    value = ast.literal_eval(text)  # literals only: never evaluates code
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(x, str) for x in value):
        raise ValueError("not a list of strings")
    return [x.strip() for x in value]


def parse_labels(text: Any) -> list[str]:
    """One ``Labels`` cell to its distinct non-empty labels, in order."""
    return list(dict.fromkeys(x for x in parse_label_entries(text) if x))


def parse_label_column(column: pd.Series, csv_name: str) -> tuple[pd.Series, pd.Series]:
    """(labels, number of list entries) per row; each distinct cell is parsed once (about
    29,000 distinct of 160,861 in the real file)."""
    parsed: dict[str, tuple[list[str], int]] = {}
    for text in column.unique():
        try:
            entries = parse_label_entries(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
            row = int(np.flatnonzero((column == text).to_numpy())[0])
            raise DataError(
                f"padchest: Labels in row {row + 1} (line {row + 2}) of {csv_name} is not a Python "
                f"list of strings such as ['pneumonia', 'nodule']: {str(text)[:120]!r} ({exc})"
            ) from None
        parsed[text] = (list(dict.fromkeys(x for x in entries if x)), len(entries))
    pairs = column.map(parsed)
    return pairs.map(lambda pair: pair[0]), pairs.map(lambda pair: pair[1]).astype("int64")


# -- exclusion list -----------------------------------------------------------------------------
def read_exclusions(path: str | Path = DEFAULT_EXCLUSIONS) -> list[tuple[int, str]]:
    """(line number, label) for every label in an exclusion file; '#' starts a comment."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"padchest: exclusion list {path} does not exist; pass a file with one label per line")
    entries = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            label = line.split("#", 1)[0].strip()
            if label:
                entries.append((number, label))
    return entries


def load_exclusions(path: str | Path = DEFAULT_EXCLUSIONS) -> tuple[str, ...]:
    """The labels of an exclusion file, in file order."""
    return tuple(label for _, label in read_exclusions(path))


def check_exclusions(entries: Iterable[tuple[int | None, str]], vocabulary: set[str], origin: str) -> None:
    """Raise on the first label that is not in ``vocabulary`` (a typo excludes nothing)."""
    for number, label in entries:
        if label in vocabulary:
            continue
        where = f"{origin}, line {number}" if number else origin
        close = difflib.get_close_matches(label, sorted(vocabulary), n=1, cutoff=0.75)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise DataError(
            f"padchest: exclusion {label!r} ({where}) is not a PadChest label: no image of the label "
            f"CSV carries it{hint} Labels are matched exactly, case and spaces included."
        )


@register_source
class PadchestSource(Source):
    name = "padchest"
    #: The study's protocol: "normal" is a no-finding label through the exclusion list (so an
    #: ``exclude`` override can make it a task), and rows without any label are skipped, neither
    #: positives nor negatives. ``no_finding=["normal", ""]`` applies the generic rule instead.
    no_finding_default = ()
    extra_task_options = ("exclusions",)

    def __init__(self, root=None, **options: Any) -> None:
        self.config = PadchestOptions.from_dict(plain_options(options))
        super().__init__(root, **self.config.to_dict())
        self.exclusion_file = Path(self.config.exclusions).expanduser() if self.config.exclusions else DEFAULT_EXCLUSIONS
        self._exclusion_entries = read_exclusions(self.exclusion_file)  # fail early if missing
        self._vocabulary: set[str] | None = None
        #: counts from the last :meth:`build_index` (listed, indexed, missing, csv)
        self.report: dict[str, Any] = {}

    # -- index --------------------------------------------------------------------------------
    def csv_path(self) -> Path:
        root = require_dir(self.root, "padchest")
        return locate_csv(root, self.config.csv, CSV_NAMES, "padchest")

    def build_index(self) -> pd.DataFrame:
        self.report = {}
        root = require_dir(self.root, "padchest")
        csv_path = self.csv_path()
        header = check_header(csv_path, REQUIRED_COLUMNS, "padchest")
        usecols = [c for c in header if c in REQUIRED_COLUMNS or c in EXTRA_COLUMNS]
        raw = read_table(csv_path, "padchest", dtype=str, keep_default_na=False, usecols=usecols)
        labels, entries = parse_label_column(raw["Labels"], csv_path.name)
        self._vocabulary = {x for row in labels for x in row}
        df = pd.DataFrame({
            "image_id": raw["ImageID"].str.strip(),
            "patient_id": raw["PatientID"].str.strip(),
            "labels": labels,
            "view": raw["Projection"].str.strip(),
        })
        df["label_entries"] = entries
        patients = {p: patient_split(p) for p in df["patient_id"].unique()}
        df["split"] = df["patient_id"].map(patients)
        image_dir = raw["ImageDir"].str.strip()
        df = _add_extras(df, raw)
        if self.config.views is not None:
            keep = df["view"].isin(self.config.views).to_numpy()
            df, image_dir = df[keep].reset_index(drop=True), image_dir[keep].reset_index(drop=True)
        df = self._attach_paths(root, df, image_dir, csv_path.name)
        return validate_index(df, "padchest")

    def _attach_paths(self, root: Path, df: pd.DataFrame, image_dir: pd.Series, csv_name: str) -> pd.DataFrame:
        folders = [root / d for d in sorted(image_dir.unique()) if d] + [root]
        found = scan_folders(folders)
        # An image not found keeps its expected path (assume_present, or the missing-image error).
        top = str(root) + os.sep
        ids = df["image_id"].tolist()
        df["path"] = [found.get(i) or (top + d + os.sep + i if d else top + i) for d, i in zip(image_dir.tolist(), ids)]
        n_missing = sum(i not in found for i in ids)
        self.report.update(listed=len(df), missing=n_missing, csv=csv_name)
        if not self.config.assume_present:
            if len(df) and n_missing == len(df):
                raise DataError(
                    f"padchest: none of the {len(df)} images listed in {csv_name} is under {root} "
                    f"(looked for ROOT/<ImageDir>/<ImageID> and ROOT/<ImageID>, e.g. {df['path'].iloc[0]}); "
                    "check the root folder, or pass assume_present=True to index the labels only"
                )
            present = set(found.values())
            df = resolve_missing(df, self.config.allow_missing, f"padchest ({csv_name} in {root})",
                                 exists=present.__contains__)
            if n_missing:
                log.info("padchest: indexing the %d of %d listed images found under %s", len(df), len(ids), root)
        self.report["indexed"] = len(df)
        return df

    # -- few-shot tasks -----------------------------------------------------------------------
    def label_vocabulary(self, index: pd.DataFrame | None = None) -> set[str]:
        """Every label of the label CSV (read once), plus those of ``index`` if given."""
        if self._vocabulary is None:
            csv_path = self.csv_path()
            check_header(csv_path, REQUIRED_COLUMNS, "padchest")
            column = read_table(csv_path, "padchest", dtype=str, keep_default_na=False, usecols=["Labels"])["Labels"]
            self._vocabulary = {x for row in parse_label_column(column, csv_path.name)[0] for x in row}
        vocabulary = set(self._vocabulary)
        if index is not None:
            vocabulary |= {x for row in index["labels"] for x in row}
        return vocabulary

    def exclusions(self, index: pd.DataFrame | None = None) -> tuple[str, ...]:
        """The labels excluded from the tasks; a replacement list is checked against the CSV."""
        if self.exclusion_file != DEFAULT_EXCLUSIONS:
            check_exclusions(self._exclusion_entries, self.label_vocabulary(index), str(self.exclusion_file))
        return tuple(label for _, label in self._exclusion_entries)

    def task_options(self, index: pd.DataFrame | None = None) -> dict[str, Any]:
        """The protocol's arguments for :func:`cxrtune.data.tasks.build_task_pool`."""
        return {**TASK_DEFAULTS, "exclude": self.exclusions(index)}

    def task_pool(self, index: pd.DataFrame, **overrides: Any):
        """The study's rare-disease tasks; ``overrides`` replace protocol arguments.

        ``exclude=[...]`` replaces the exclusion list (each label is checked against the CSV) and
        ``exclusions=PATH`` reads the replacement from a file.
        """
        if "exclusions" in overrides and "exclude" in overrides:
            raise DataError("padchest: pass either exclude=[labels] or exclusions=PATH, not both")
        options = dict(TASK_DEFAULTS)
        if "exclusions" in overrides:
            file = overrides.pop("exclusions")
            entries = read_exclusions(file)
            check_exclusions(entries, self.label_vocabulary(index), str(file))
            options["exclude"] = tuple(label for _, label in entries)
        elif "exclude" in overrides:
            labels = tuple(str(x).strip() for x in overrides.pop("exclude"))
            check_exclusions([(None, x) for x in labels], self.label_vocabulary(index), "the exclude override")
            options["exclude"] = labels
        else:
            options["exclude"] = self.exclusions(index)
        if self.config.single_label == "entries":
            if "label_entries" not in index.columns:
                raise DataError(
                    "padchest: the index has no label_entries column, which single_label='entries' needs; "
                    "rebuild the index with this version, or pass single_label='labels' to the source"
                )
            index = index[index["label_entries"] <= 1]
        if "force_include" not in overrides:
            # The study's forced disease may be absent from a partial copy: then it is simply not a
            # task (build_task_pool refuses to force a label that no image carries).
            present = {x for row in index["labels"] for x in row}
            options["force_include"] = tuple(x for x in options["force_include"] if x in present)
        options.update(overrides)
        return self.build_pool(index, **options)


def _add_extras(df: pd.DataFrame, raw: pd.DataFrame) -> pd.DataFrame:
    for column, name in EXTRA_COLUMNS.items():
        if column not in raw.columns:
            continue
        if name in ("birth_year", "original_height", "original_width"):
            df[name] = pd.to_numeric(raw[column], errors="coerce").astype("Int64")
        else:
            df[name] = raw[column].str.strip()
    if "study_date" in df.columns and "birth_year" in df.columns:
        year = pd.to_numeric(df["study_date"].str[:4], errors="coerce").astype("Int64")
        df["age"] = year - df["birth_year"]
    return df
