"""Tiny archives in the exact on-disk layouts of NIH ChestX-ray14, PadChest and a user CSV.

Real formats, synthetic content: the CSV headers, list files, folder names and label encodings
are those of the real datasets; the images are small structured PNGs in the four pixel formats
a source must decode (8-bit grey, 16-bit grey, RGB, RGBA). Every writer returns a plain dict
describing what it wrote, so a test can compare an index against it.

    from _fixtures_layouts import write_nih_layout, write_padchest_layout, write_png

    layout = write_nih_layout(tmp_path / "nih", n_patients=6, kaggle=True)
    layout["root"], layout["csv"], layout["images"]["00000001_000.png"]  # -> Path

Import with the tests folder on ``sys.path`` (pytest's default import mode puts it there).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

#: The pixel formats every file source must read, as written by :func:`write_png`.
PNG_KINDS = ("grey8", "grey16", "rgb", "rgba")

NIH_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
#: Label strings cycled over the NIH images (one image each): single, multi and "No Finding".
NIH_LABELS = ("No Finding", "Hernia", "Fibrosis|Hernia", "Effusion", "No Finding", "Mass|Nodule|Effusion")

PADCHEST_CSV = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
#: The real file's header, first (unnamed) index column included.
PADCHEST_HEADER = (
    "", "ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth",
    "PatientSex_DICOM", "ViewPosition_DICOM", "Projection", "MethodProjection", "Pediatric",
    "Modality_DICOM", "Manufacturer_DICOM", "PhotometricInterpretation_DICOM",
    "PixelRepresentation_DICOM", "PixelAspectRatio_DICOM", "SpatialResolution_DICOM",
    "BitsStored_DICOM", "WindowCenter_DICOM", "WindowWidth_DICOM", "Rows_DICOM", "Columns_DICOM",
    "XRayTubeCurrent_DICOM", "Exposure_DICOM", "ExposureInuAs_DICOM", "ExposureTime",
    "RelativeXRayExposure_DICOM", "ReportID", "Report", "MethodLabel", "Labels", "Localizations",
    "LabelsLocalizationsBySentence", "labelCUIS", "LocalizationsCUIS",
)
#: Labels cells cycled over the PadChest rows, spelled as in the real file (leading spaces,
#: empty strings, repeats), each with the list a source must parse it to.
PADCHEST_LABEL_CELLS: tuple[tuple[str, list[str]], ...] = (
    ("['normal']", ["normal"]),
    ("['hiatal hernia']", ["hiatal hernia"]),
    ("['pulmonary fibrosis', ' chronic changes', ' kyphosis']", ["pulmonary fibrosis", "chronic changes", "kyphosis"]),
    ("['']", []),
    ("['bronchiectasis', '']", ["bronchiectasis"]),
    ("['pneumonia', ' pneumonia']", ["pneumonia"]),
    ("", []),  # a few real rows have no Labels value at all
    ("['calcified granuloma']", ["calcified granuloma"]),
)


# -- pixels -------------------------------------------------------------------------------------
def structured_array(kind: str, height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    """A radiograph-like image (gradient, bright disc, noise) as the array a PNG of ``kind`` holds.

    ``grey16`` uses the narrow window 1000..3000 of the 16-bit range, as real 12-bit detectors do,
    so only min-max normalisation *before* quantising recovers full contrast.
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    unit = 0.6 * x / max(width - 1, 1) + 0.2 * y / max(height - 1, 1)
    disc = (x - width * 0.6) ** 2 + (y - height * 0.45) ** 2 < (min(height, width) / 5) ** 2
    unit = np.clip(unit + 0.3 * disc + rng.normal(0, 0.02, unit.shape), 0, 1)
    if kind == "grey8":
        return np.rint(unit * 255).astype(np.uint8)
    if kind == "grey16":
        return np.rint(1000 + unit * 2000).astype(np.uint16)
    grey = np.rint(unit * 255).astype(np.uint8)
    if kind == "rgb":
        # Unequal channels so that the luma weights matter.
        return np.stack([grey, (grey * 0.8).astype(np.uint8), (grey * 0.6).astype(np.uint8)], axis=-1)
    if kind == "rgba":
        alpha = np.full_like(grey, 255)
        alpha[: height // 4] = 128  # alpha must be ignored
        return np.stack([grey, grey, grey, alpha], axis=-1)
    raise ValueError(f"kind = {kind!r}: use one of {PNG_KINDS}")


def write_png(path: str | Path, kind: str = "grey8", height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    """Write a ``kind`` PNG (see :data:`PNG_KINDS`) and return the array it holds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = structured_array(kind, height, width, seed)
    if kind == "grey16":
        image = Image.fromarray(arr.astype(np.uint16))
        if image.mode != "I;16":
            image = image.convert("I;16")
    else:
        image = Image.fromarray(arr)
    image.save(path)
    return arr


# -- NIH ChestX-ray14 -----------------------------------------------------------------------------
def write_nih_layout(
    root: str | Path,
    n_patients: int = 6,
    images_per_patient: int = 2,
    *,
    kaggle: bool = False,
    official_lists: bool = True,
    csv_name: str = "Data_Entry_2017_v2020.csv",
    labels: Sequence[str] = NIH_LABELS,
    omit_images: Sequence[str] = (),
    size: tuple[int, int] = (48, 64),
) -> dict:
    """Write an NIH ChestX-ray14 folder and return what it holds.

    Patients are numbered 1..n_patients; image ``{patient:08d}_{k:03d}.png`` gets the label
    string ``labels[i % len(labels)]`` (i = running image number), views alternate PA/AP and
    pixel formats cycle through :data:`PNG_KINDS`. The first half of the patients' images go to
    ``images_001/``, the rest to ``images_002/`` (``images_00N/images/`` when ``kaggle``).
    With ``official_lists``, patients whose number is divisible by 3 form ``test_list.txt``
    and the others ``train_val_list.txt``. ``omit_images`` are listed in the CSV but not written.

    Returns ``{"root", "csv", "images": {name: path}, "labels": {name: [labels]},
    "patient": {name: patient id}, "view": {name: view}, "kind": {name: png kind},
    "test": set of test image names}``; images in ``omit_images`` are in ``labels`` but not in
    ``images``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    out: dict = {"root": root, "csv": root / csv_name, "images": {}, "labels": {}, "patient": {},
                 "view": {}, "kind": {}, "test": set()}
    lines, i = [NIH_HEADER], 0
    height, width = size
    for patient in range(1, n_patients + 1):
        folder = root / ("images_001" if patient <= (n_patients + 1) // 2 else "images_002")
        if kaggle:
            folder = folder / "images"
        for k in range(images_per_patient):
            name = f"{patient:08d}_{k:03d}.png"
            label = labels[i % len(labels)]
            view = "PA" if i % 2 == 0 else "AP"
            kind = PNG_KINDS[i % len(PNG_KINDS)]
            lines.append(f"{name},{label},{k},{patient},{40 + patient},{'MF'[patient % 2]},{view},"
                         f"{width},{height},0.143,0.143")
            out["labels"][name] = label.split("|")
            out["patient"][name], out["view"][name], out["kind"][name] = str(patient), view, kind
            if official_lists and patient % 3 == 0:
                out["test"].add(name)
            if name not in omit_images:
                write_png(folder / name, kind, height, width, seed=i)
                out["images"][name] = folder / name
            i += 1
    out["csv"].write_text("\n".join(lines) + "\n")
    if official_lists:
        names = list(out["labels"])
        (root / "test_list.txt").write_text("\n".join(n for n in names if n in out["test"]) + "\n")
        (root / "train_val_list.txt").write_text("\n".join(n for n in names if n not in out["test"]) + "\n")
    return out


# -- PadChest -----------------------------------------------------------------------------------
def write_padchest_layout(
    root: str | Path,
    rows: Sequence[dict] | None = None,
    *,
    n_rows: int = 16,
    on_disk: Sequence[int] | None = None,
    csv_name: str = PADCHEST_CSV,
    size: tuple[int, int] = (48, 64),
) -> dict:
    """Write a PadChest folder (label CSV with the real header, images in ``ImageDir`` folders).

    ``rows``: dicts with keys ``labels`` (the raw Labels cell, e.g. ``"['normal']"``), and
    optionally ``patient``, ``projection``, ``image_dir``, ``image_id``. Without ``rows``,
    ``n_rows`` rows cycle through :data:`PADCHEST_LABEL_CELLS`, projections PA/AP/L/AP_horizontal
    and two ImageDir folders (0 and 1), two rows per patient. ``on_disk`` lists the row positions
    whose PNG is written (default: all); the pixel formats cycle through :data:`PNG_KINDS`.

    Returns ``{"root", "csv", "rows": [dict per row with image_id, patient, projection,
    image_dir, labels_cell, path, on_disk]}``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if rows is None:
        projections = ("PA", "AP", "L", "AP_horizontal")
        rows = [{"labels": PADCHEST_LABEL_CELLS[i % len(PADCHEST_LABEL_CELLS)][0],
                 "projection": projections[i % len(projections)], "image_dir": str(i % 2),
                 "patient": f"{1000 + i // 2}"} for i in range(n_rows)]
    keep = set(range(len(rows))) if on_disk is None else set(on_disk)
    height, width = size
    written = []
    csv_path = root / csv_name
    with open(csv_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(PADCHEST_HEADER)
        for i, row in enumerate(rows):
            image_id = row.get("image_id", f"2168401113669640{i:05d}_{i:02d}-{i:03d}-000.png")
            patient = str(row.get("patient", 1000 + i))
            image_dir = str(row.get("image_dir", "0"))
            projection = row.get("projection", "PA")
            record = {h: "" for h in PADCHEST_HEADER}
            record.update({
                "": i, "ImageID": image_id, "ImageDir": image_dir, "StudyDate_DICOM": "20150914",
                "StudyID": f"study{i}", "PatientID": patient, "PatientBirth": "1950.0",
                "PatientSex_DICOM": "MF"[i % 2], "Projection": projection,
                "MethodProjection": "Manual review of DICOM fields", "Pediatric": "No",
                "Rows_DICOM": height, "Columns_DICOM": width, "MethodLabel": "Physician",
                "Labels": row["labels"], "Report": "sin hallazg patolog .",
            })
            writer.writerow([record[h] for h in PADCHEST_HEADER])
            path = root / image_dir / image_id
            if i in keep:
                write_png(path, PNG_KINDS[i % len(PNG_KINDS)], height, width, seed=i)
            written.append({"image_id": image_id, "patient": patient, "projection": projection,
                            "image_dir": image_dir, "labels_cell": row["labels"], "path": path,
                            "on_disk": i in keep})
    return {"root": root, "csv": csv_path, "rows": written}


# -- a user's CSV ---------------------------------------------------------------------------------
def write_csv_layout(root: str | Path, n_images: int = 8, *, header: Sequence[str] = ("path", "labels", "patient_id"),
                     sep: str = "|", size: tuple[int, int] = (48, 64)) -> dict:
    """Write ``root/labels.csv`` and its images under ``root/scans/`` (relative paths).

    Image i has labels ``["A"]``, ``["A", "B"]``, ``[]`` or ``["C"]`` (cycled), patient
    ``P{i // 2}`` and pixel format ``PNG_KINDS[i % 4]``. Columns beyond path/labels/patient_id
    in ``header`` (``view``, ``split``, ``image_id``) get values PA/AP, train/val/test and
    ``img{i}``. Returns ``{"root", "csv", "images": {relative path: absolute path},
    "labels": {relative path: [labels]}}``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    cycle = (["A"], ["A", "B"], [], ["C"])
    out: dict = {"root": root, "csv": root / "labels.csv", "images": {}, "labels": {}}
    height, width = size
    with open(out["csv"], "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for i in range(n_images):
            rel = f"scans/s{i % 2}/img{i}.png"
            labels = cycle[i % len(cycle)]
            values = {"path": rel, "labels": sep.join(labels), "patient_id": f"P{i // 2}",
                      "view": "PA" if i % 2 == 0 else "AP", "split": ("train", "val", "test")[(i // 2) % 3],
                      "image_id": f"img{i}"}
            writer.writerow([values.get(h, "") for h in header])
            write_png(root / rel, PNG_KINDS[i % len(PNG_KINDS)], height, width, seed=i)
            out["images"][rel], out["labels"][rel] = root / rel, labels
    return out


def expected_grey_uint8(arr: np.ndarray) -> np.ndarray:
    """The study's rule written out independently: luma (ITU-R 601-2) for colour, alpha ignored,
    min-max over the raw values, then quantise to 0..255 (no resizing)."""
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim == 3:
        arr = 0.299 * arr[..., 0] + 0.587 * arr[..., 1] + 0.114 * arr[..., 2]
    lo, hi = arr.min(), arr.max()
    unit = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    return np.clip(np.rint(unit * 255), 0, 255).astype(np.uint8)


def centre_square(arr: np.ndarray) -> np.ndarray:
    """The centre crop to a square (what ``fit="crop"`` does before resizing)."""
    h, w = arr.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return arr[top: top + side, left: left + side]
