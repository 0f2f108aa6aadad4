"""The Parquet index every source produces.

One row per image with the columns in :data:`INDEX_COLUMNS`:

- ``image_id`` (str, unique): the file name or the source's own id;
- ``patient_id`` (str): studies of one patient share it; splits never cut a patient in two;
- ``labels`` (list of str): the source's labels verbatim, e.g. ``["Hernia", "Fibrosis"]``;
  an image without findings carries the source's own word (NIH ``"No Finding"``, PadChest
  ``"normal"``); an empty list means the source gave no label at all;
- ``view`` (str): projection, e.g. ``PA``, ``AP``, ``L``;
- ``split`` (str): one of :data:`SPLITS`; few-shot training draws from ``train``, testing from
  ``val`` (and ``test`` where a source has no ``val``);
- ``path`` (str): absolute path of the image file (empty for rendered sources such as phantom).

Sources may add columns (age, sex, study id, finding severity, ...). The index is written with
its source name and options in the Parquet schema metadata, atomically (temp file + rename).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cxrtune.errors import DataError

INDEX_COLUMNS = ("image_id", "patient_id", "labels", "view", "split", "path")
SPLITS = ("train", "val", "test")
_META_KEY = b"cxrtune"


def patient_split(patient_id: str, val_modulus: int = 5) -> str:
    """The study's patient split: ``val`` when md5(patient id) % 5 == 0, else ``train``."""
    digest = hashlib.md5(str(patient_id).encode("utf-8")).hexdigest()
    return "val" if int(digest, 16) % val_modulus == 0 else "train"


def validate_index(df: pd.DataFrame, source: str = "index") -> pd.DataFrame:
    """Check the schema and invariants; return the frame with canonical dtypes and order."""
    missing = [c for c in INDEX_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{source}: index lacks column(s) {missing}; required columns are {list(INDEX_COLUMNS)}")
    if df["image_id"].duplicated().any():
        dup = df.loc[df["image_id"].duplicated(), "image_id"].iloc[0]
        raise DataError(f"{source}: image_id {dup!r} occurs more than once; image ids must be unique")
    bad_split = sorted(set(df["split"]) - set(SPLITS))
    if bad_split:
        raise DataError(f"{source}: split value(s) {bad_split} are not valid: use {', '.join(SPLITS)}")
    for col in ("image_id", "patient_id", "view", "split", "path"):
        df[col] = df[col].astype(str)
    df["labels"] = df["labels"].map(lambda v: [str(x) for x in v] if v is not None else [])
    per_patient = df.groupby("patient_id")["split"].nunique()
    crossing = per_patient[per_patient > 1]
    if len(crossing):
        raise DataError(
            f"{source}: patient {crossing.index[0]!r} appears in more than one split; "
            "splits must be patient-disjoint"
        )
    ordered = list(INDEX_COLUMNS) + [c for c in df.columns if c not in INDEX_COLUMNS]
    return df[ordered].reset_index(drop=True)


def write_index(df: pd.DataFrame, path: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write the index atomically with ``metadata`` (JSON-able) in the schema metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(df, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[_META_KEY] = json.dumps(dict(metadata or {}), sort_keys=True, default=str).encode()
    table = table.replace_schema_metadata(meta)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_index(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"index file {path} does not exist; build it with `cxrtune data index`")
    df = pq.read_table(path).to_pandas()
    df["labels"] = df["labels"].map(lambda v: [str(x) for x in v] if v is not None else [])
    return df


def read_index_metadata(path: str | Path) -> dict[str, Any]:
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(_META_KEY)
    return json.loads(raw) if raw else {}


def index_digest(df: pd.DataFrame) -> str:
    """A stable digest of an index's content (row order included)."""
    h = hashlib.sha256()
    for col in INDEX_COLUMNS:
        for value in df[col]:
            h.update(("|".join(value) if isinstance(value, list) else str(value)).encode("utf-8"))
            h.update(b"\x1f")
        h.update(b"\x1e")
    return h.hexdigest()
