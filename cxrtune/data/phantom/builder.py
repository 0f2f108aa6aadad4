"""The phantom dataset: which synthetic patients and studies exist, and how a row is rendered.

Layout (deterministic from ``PhantomConfig.seed``):

- ``pretrain``: ``n_pretrain`` unlabelled images, ``studies_per_patient`` studies per patient;
  each patient carries one of the ten findings with probability ``10 x prevalence`` (labelled
  truthfully), else is normal.
- ``fewshot``: a labelled pool of patients with ``fewshot_studies`` studies each: per finding
  enough positive patients for ``train_pos`` / ``val_pos`` images, plus normal patients for
  ``train_neg`` / ``val_neg`` images. Every few-shot image has exactly one label.

Patients never cross subsets or splits. A patient's finding (kind, severity, placement) is the
same in all of its studies; studies differ in pose, exposure, noise, collimation and marker.
Rows are ordered by patient, so a chunk of consecutive rows reuses each patient's warped layers.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd

from cxrtune.config import Config, param
from cxrtune.data.phantom.findings import FINDINGS, NORMAL, SEVERITY_BETA, boxes_of, make_finding
from cxrtune.data.phantom.render import BaseAnatomy, Patient, make_patient, pose_mask, render_study

#: Findings whose masks span both lungs get one box per side.
BILATERAL = {"interstitial pattern", "reticular interstitial pattern", "pulmonary fibrosis", "bronchiectasis"}
BOX_COLUMNS = ("box_x0", "box_y0", "box_x1", "box_y1")
#: Image size at which the index's boxes are computed (normalised to [0, 1]).
BOX_SIZE = 128


@dataclasses.dataclass
class PhantomConfig(Config):
    """Every default of the phantom source."""

    seed: int = param(0, low=0, doc="seed of the whole dataset: same seed, same bytes")
    n_pretrain: int = param(10000, low=0, high=10_000_000, doc="unlabelled pretraining images")
    studies_per_patient: int = param(4, low=1, high=50, doc="pretraining studies per synthetic patient")
    prevalence: float = param(0.01, low=0.0, high=0.1, doc="share of pretraining patients with each finding")
    train_pos: int = param(80, low=1, doc="few-shot training positives per finding (images)")
    val_pos: int = param(60, low=1, doc="few-shot validation positives per finding (images)")
    train_neg: int = param(2000, low=2, doc="few-shot training negatives (normal images)")
    val_neg: int = param(500, low=2, doc="few-shot validation negatives (normal images)")
    fewshot_studies: int = param(2, low=1, high=10, doc="studies per few-shot patient")
    ct: str | None = param(None, doc="NIfTI chest CT to use instead of the default (or $CXRTUNE_PHANTOM_CT)")
    findings: tuple[str, ...] = param(FINDINGS, choices=FINDINGS, doc="findings to include")

    def validate(self) -> None:
        if len(set(self.findings)) != len(self.findings):
            from cxrtune.errors import ConfigError

            raise ConfigError(f"PhantomConfig.findings = {list(self.findings)} names a finding twice")


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint32)[0])


def plan_rows(cfg: PhantomConfig, n_anatomies: int = 1) -> pd.DataFrame:
    """The dataset's rows (without boxes): patients, studies, findings, severities, seeds."""
    rows: list[dict] = []
    rng = np.random.default_rng([cfg.seed, 11])
    finding_code = {name: i for i, name in enumerate(FINDINGS)}

    def add_patient(subset: str, k: int, split: str, finding: str, n_studies: int) -> None:
        pseed = _seed(cfg.seed, 0 if subset == "pretrain" else 1, k)
        severity = 0.0
        fseed = 0
        if finding != NORMAL:
            a, b = SEVERITY_BETA[finding]
            srng = np.random.default_rng([pseed, 5])
            severity = float(np.clip(srng.beta(a, b), 0.02, 1.0))
            fseed = _seed(pseed, 7, finding_code[finding])
        pid = f"phantom-{cfg.seed}-{subset[0]}{k:06d}"
        for j in range(n_studies):
            rows.append({
                "image_id": f"{pid}-s{j}", "patient_id": pid, "labels": [finding], "view": "PA",
                "split": split, "path": "", "subset": subset, "anatomy": int(pseed % n_anatomies),
                "patient_seed": pseed, "study_seed": _seed(pseed, 9, j), "finding": finding,
                "severity": severity, "finding_seed": fseed,
            })

    n_patients = math.ceil(cfg.n_pretrain / cfg.studies_per_patient) if cfg.n_pretrain else 0
    p_any = min(1.0, cfg.prevalence * len(cfg.findings))
    remaining = cfg.n_pretrain
    for k in range(n_patients):
        finding = NORMAL
        if rng.random() < p_any:
            finding = cfg.findings[int(rng.integers(len(cfg.findings)))]
        n = min(cfg.studies_per_patient, remaining)
        add_patient("pretrain", k, "train", finding, n)
        remaining -= n
    k = 0
    per = cfg.fewshot_studies
    groups = [(f, "train", cfg.train_pos) for f in cfg.findings] + [(f, "val", cfg.val_pos) for f in cfg.findings]
    groups += [(NORMAL, "train", cfg.train_neg), (NORMAL, "val", cfg.val_neg)]
    for finding, split, n_images in groups:
        for _ in range(math.ceil(n_images / per)):
            add_patient("fewshot", k, split, finding, per)
            k += 1
    df = pd.DataFrame.from_records(rows)
    return df


class Renderer:
    """Renders rows, keeping the last patients' warped layers (rows come ordered by patient)."""

    def __init__(self, pool: tuple[BaseAnatomy, ...], keep: int = 8) -> None:
        self.pool = pool
        self.keep = keep
        self._patients: dict[tuple, Patient] = {}
        self._findings: dict[tuple, object] = {}

    def patient(self, anatomy: int, seed: int, size: int, light: bool = False, finding: str | None = None,
                severity: float = 0.0) -> Patient:
        """The patient with ``finding``'s clinical correlates (a row's patient: :meth:`of`)."""
        key = (anatomy, seed, size, light, finding, severity)
        p = self._patients.get(key)
        if p is None:
            p = make_patient(self.pool[anatomy % len(self.pool)], size, seed, light=light, finding=finding,
                             severity=severity)
            if len(self._patients) >= self.keep:
                self._patients.pop(next(iter(self._patients)))
            self._patients[key] = p
        return p

    def of(self, row, size: int, light: bool = False) -> Patient:
        """The row's patient (its finding's correlates included)."""
        return self.patient(int(row.anatomy), int(row.patient_seed), size, light=light, finding=row.finding,
                            severity=float(row.severity))

    def finding(self, row, size: int, light: bool = False):
        """The row's finding on its patient (shared by the patient's studies)."""
        key = (int(row.anatomy), int(row.patient_seed), size, light, row.finding, int(row.finding_seed),
               float(row.severity))
        eff = self._findings.get(key)
        if eff is None:
            p = self.of(row, size, light=light)
            eff = make_finding(row.finding, p, int(row.finding_seed), float(row.severity))
            if len(self._findings) >= self.keep:
                self._findings.pop(next(iter(self._findings)))
            self._findings[key] = eff
        return eff

    def render(self, row, size: int) -> np.ndarray:
        p = self.of(row, size)
        if row.finding == NORMAL:
            return render_study(p, int(row.study_seed))[0]
        return render_study(p, int(row.study_seed), self.finding(row, size).delta)[0]

    def mask(self, row, size: int) -> np.ndarray:
        """The row's ground-truth mask (bool, size x size); all False for a normal image."""
        if row.finding == NORMAL:
            return np.zeros((size, size), bool)
        p = self.of(row, size, light=True)
        return pose_mask(p, int(row.study_seed), self.finding(row, size, light=True).mask)

    def boxes(self, row, size: int = BOX_SIZE) -> list[tuple[float, float, float, float]]:
        m = self.mask(row, size)
        p = self.of(row, size, light=True)
        return boxes_of(m, p.mid_col if row.finding in BILATERAL else None)


def add_boxes(df: pd.DataFrame, renderer: Renderer) -> pd.DataFrame:
    """Box columns (union box, normalised) and ``boxes`` (flat x0, y0, x1, y1 per box)."""
    union = np.full((len(df), 4), np.nan)
    flat: list[list[float]] = [[] for _ in range(len(df))]
    for i, row in enumerate(df.itertuples(index=False)):
        if row.finding == NORMAL:
            continue
        bxs = renderer.boxes(row)
        if bxs:
            arr = np.array(bxs)
            union[i] = [arr[:, 0].min(), arr[:, 1].min(), arr[:, 2].max(), arr[:, 3].max()]
            flat[i] = [float(v) for b in bxs for v in b]
    df = df.copy()
    for j, col in enumerate(BOX_COLUMNS):
        df[col] = union[:, j]
    df["boxes"] = flat
    return df
