"""One resolution of configuration: (profile, method, fixed keys, ``--set``, a sampled point) ->
the typed config a run trains with, and where every value came from.

Layers apply in order, each a flat dict of dotted keys; a later layer wins:

1. ``default``: the dataclasses' defaults;
2. ``method M: study preset``: the method's recipe (:mod:`cxrtune.methods.registry`);
3. ``profile P: scale``, then ``method M: <preset> preset``, then ``profile P: budget`` and
   ``profile P: probe`` (:mod:`cxrtune.profiles`);
4. the caller's fixed keys (a sweep script's ``fixed``), ``--set``, and a sampled point.

``cxrtune pretrain``, every sweep driver and every trial go through :func:`resolve_pretrain` or
:func:`pretrain_trial`; ``--print-config`` prints :meth:`Resolved.table`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from cxrtune.config import Config, param
from cxrtune.engine.config import PretrainConfig
from cxrtune.errors import ConfigError
from cxrtune.evaluate.probe import ProbeConfig
from cxrtune.health import HealthConfig
from cxrtune.methods.registry import get_method, method_names
from cxrtune.plan import asha_rungs
from cxrtune.profiles import Profile, get_profile


@dataclass
class InLoopProbeConfig(Config):
    """The few-shot probe that judges a pretraining trial at every checkpoint. ``shots``, ``trials``
    and ``test_negatives`` shape the validation episodes, which the sweep driver samples once."""

    shots: tuple[int, ...] = param((5, 20), low=1, doc="shot counts of the validation episodes")
    trials: int = param(3, low=1, doc="episodes per (finding, shots)")
    test_negatives: str = param("matched", choices=("matched", "all"),
                                doc="matched: as many test negatives as positives (the study); all: every one")
    input_size: int = param(64, low=16, doc="backbone input side for the probe (px)")
    crop_fraction: float = param(1.0, low=0, high=1, low_open=True, doc="centre crop of the cached side for the probe")
    linear: ProbeConfig = field(default_factory=ProbeConfig)


@dataclass
class TrialOptions(Config):
    pretrain_subset: str = param("pretrain", doc="train on rows whose 'subset' column has this value, if the index has one")
    threads: int = param(0, low=0, doc="torch CPU threads for this trial (0 = leave as is)")


#: the sections of a pretraining trial's flat config besides PretrainConfig's
_TRIAL_SECTIONS: dict[str, type[Config]] = {"probe": InLoopProbeConfig, "health": HealthConfig, "trial": TrialOptions}
#: keys the sweep driver reads (to sample the episodes once), never a trial: not searchable
DRIVER_KEYS = ("probe.shots", "probe.trials", "probe.test_negatives")


@dataclass
class Resolved:
    """A resolved config: every flat key, its value and the layer that set it."""

    flat: dict[str, Any]
    origin: dict[str, str]

    def rows(self, searched: Mapping[str, str] | None = None) -> list[tuple[str, str, str]]:
        """(key, value, origin); ``searched``: key -> (domain text, origin text) shown instead."""
        searched = searched or {}
        return [(key, *(searched[key] if key in searched else (repr(value), self.origin[key])))
                for key, value in self.flat.items()]

    def table(self, title: str, searched: Mapping[str, tuple[str, str]] | None = None) -> str:
        rows = self.rows(searched)
        width = max(len(k) for k, _, _ in rows)
        vwidth = min(40, max(len(v) for _, v, _ in rows))
        return "\n".join([f"# {title}: the config that will run, and where each value comes from",
                          *(f"{k:<{width}}  {v:<{vwidth}}  {o}" for k, v, o in rows)])


@dataclass
class PretrainResolved(Resolved):
    pretrain: PretrainConfig = None  # type: ignore[assignment]
    probe: InLoopProbeConfig = None  # type: ignore[assignment]
    health: HealthConfig = None  # type: ignore[assignment]
    trial: TrialOptions = None  # type: ignore[assignment]

    def engine_only(self) -> "PretrainResolved":
        """The pretraining keys alone (what ``cxrtune pretrain`` runs: no probe, health or trial keys)."""
        keep = [k for k in self.flat if k.split(".", 1)[0] not in _TRIAL_SECTIONS]
        return PretrainResolved(flat={k: self.flat[k] for k in keep}, origin={k: self.origin[k] for k in keep},
                                pretrain=self.pretrain, probe=self.probe, health=self.health, trial=self.trial)


def _unknown(key: str, known: Iterable[str], what: str, origin: str, method: str | None = None) -> ConfigError:
    owner = key.split(".", 1)[0]
    if owner in method_names() and owner != method:
        return ConfigError(f"{origin}: config key {key!r} belongs to method {owner}; {what} has "
                           f"{method or 'another method'}'s keys only")
    close = difflib.get_close_matches(key, list(known), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"{origin}: unknown config key {key!r} for {what}{hint}")


def _apply(flat: dict[str, Any], origin: dict[str, str], layer: str, values: Mapping[str, Any] | None,
           what: str, method: str | None = None, other_methods_silent: bool = False) -> None:
    for key, value in (values or {}).items():
        if key == "method" and method is not None and value != method:
            raise ConfigError(f"{layer}: method = {value!r} cannot be set here: this is a {method} run (a sweep "
                              "script fixes its method; cxrtune pretrain takes --method)")
        if key not in flat:
            owner = key.split(".", 1)[0]
            if other_methods_silent and method is not None and owner in method_names() and owner != method:
                continue  # a profile's key for another method
            raise _unknown(key, flat, what, layer, method)
        flat[key] = list(value) if isinstance(value, tuple) else value
        origin[key] = layer


def _pretrain_defaults(method: str) -> dict[str, Any]:
    flat = PretrainConfig(method=method).to_flat()
    for section, cls in _TRIAL_SECTIONS.items():
        flat.update(cls().to_flat(prefix=f"{section}."))
    return flat


def resolve_pretrain(profile: str | Profile, method: str, *, fixed: Mapping[str, Any] | None = None,
                     fixed_origin: str = "fixed", sets: Mapping[str, Any] | None = None,
                     point: Mapping[str, Any] | None = None, point_origin: str = "searched",
                     method_origin: str = "--method", asha: tuple[int, int] | None = None,
                     budgeted: bool = False) -> PretrainResolved:
    """The config of a pretraining run of ``method`` under ``profile``, with its provenance.

    ``asha=(grace, reduction)``: the run is a trial of a sweep whose ASHA judges it at these rungs;
    unless the sweep script or ``--set`` chose ``train.checkpoint_epochs``, the trial checkpoints
    (and so is judged) at every rung (:func:`cxrtune.plan.asha_rungs`). ``budgeted``: the sweep
    runs to a budget, where warmup-stable-decay is the default schedule (a rung's judgement then
    does not depend on how long the trial would train) unless the script or ``--set`` chose one."""
    profile = get_profile(profile) if isinstance(profile, str) else profile
    entry = get_method(method)
    flat = _pretrain_defaults(method)
    origin = {key: "default" for key in flat}
    origin["method"] = method_origin
    what = f"a {method} run"
    _apply(flat, origin, f"method {method}: study preset", entry.preset("study"), what, method)
    _apply(flat, origin, f"profile {profile.name}: scale", profile.scale, what, method)
    if profile.preset != "study":
        _apply(flat, origin, f"method {method}: {profile.preset} preset", entry.preset(profile.preset), what, method)
    _apply(flat, origin, f"profile {profile.name}: budget", profile.budget, what, method, other_methods_silent=True)
    for layer, values in ((f"profile {profile.name}: probe", profile.probe), (fixed_origin, fixed), ("--set", sets)):
        _apply(flat, origin, layer, values, what, method)
    if budgeted and origin["optim.schedule"] not in (fixed_origin, "--set"):
        _apply(flat, origin, "sweep: budgeted (--budget-hours)", {"optim.schedule": "wsd"}, what, method)
    if asha is not None and origin["train.checkpoint_epochs"] not in (fixed_origin, "--set"):
        epochs = int(flat["train.epochs"])
        grace, eta = min(asha[0], epochs), asha[1]
        _apply(flat, origin, f"sweep: ASHA's rungs (grace {grace}, reduction {eta})",
               {"train.checkpoint_epochs": tuple(asha_rungs(grace, eta, epochs)[:-1])}, what, method)
    _apply(flat, origin, point_origin, point, what, method)
    return _typed(flat, origin)


def split_pretrain_flat(flat: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(PretrainConfig keys, {section: its keys without the prefix}) of a trial's flat config."""
    pre: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {name: {} for name in _TRIAL_SECTIONS}
    for key, value in flat.items():
        head, _, rest = key.partition(".")
        if head in sections and rest:
            sections[head][rest] = value
        else:
            pre[key] = value
    return pre, sections


def _typed(flat: dict[str, Any], origin: dict[str, str]) -> PretrainResolved:
    pre, sections = split_pretrain_flat(flat)
    pretrain = PretrainConfig().override(pre)
    typed = {name: cls.from_flat(sections[name]) for name, cls in _TRIAL_SECTIONS.items()}
    return PretrainResolved(flat=flat, origin=origin, pretrain=pretrain, **typed)


def pretrain_trial(flat: Mapping[str, Any]) -> PretrainResolved:
    """The typed config of a trial from the flat dict it was given (a resolved config plus a
    sampled point); keys of no section are refused, naming the valid ones."""
    method = flat.get("method", "moco")
    known = _pretrain_defaults(method)
    unknown = [k for k in flat if k not in known]
    if unknown:
        raise _unknown(unknown[0], known, f"a {method} trial", "trial config", method)
    merged = {**known, **flat}
    origin = {k: ("trial config" if k in flat else "default") for k in merged}
    return _typed(merged, origin)


def resolve_flat(defaults: Mapping[str, Any], layers: Iterable[tuple[str, Mapping[str, Any] | None]],
                 what: str) -> Resolved:
    """The generic resolution: ``defaults`` (every valid key), then each (origin, values) layer."""
    flat = {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}
    origin = {key: "default" for key in flat}
    for layer, values in layers:
        _apply(flat, origin, layer, values, what)
    return Resolved(flat=flat, origin=origin)
