"""The command line of every pretraining sweep script, and what the driver does around Tune.

A sweep script declares a :class:`PretrainSweep` (method, search space, the study's setting as
the seed point, objective) and calls :func:`main`. The driver then

1. resolves a trial's config once (:func:`cxrtune.resolve.resolve_pretrain`: the method's presets,
   the profile, the script's fixed keys, ``--set``); ``--print-config`` prints it and stops;
2. builds (or reuses) the image caches and samples the validation episodes once
   (:mod:`cxrtune.sweep.data`), from ``--eval-source`` when validation uses another archive;
3. runs the Tune sweep (Optuna TPE, ASHA on the downstream objective, MLflow tracking); Ray's own
   console output goes to ``<sweep>/ray-console.log`` unless ``--verbose``;
4. prints the table of trials, the best checkpoint against random init and exports it
   (:mod:`cxrtune.sweep.summary`), then writes the sweep's HTML report unless ``--no-report``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any

from cxrtune.errors import CxrtuneError
from cxrtune.profiles import PROFILES, Profile, get_profile, profile_notes
from cxrtune.sweep.args import (RECORD_DEFAULTS, add_common_arguments, add_eval_source_arguments, apply_record,
                                parse_sets, positive_float, positive_int, resume_hint, run_command, share,
                                sweep_record, with_defaults)
from cxrtune.sweepfolder import CONSOLE_LOG
from cxrtune.sweep.data import EpisodePlan, data_params, prepare_data
from cxrtune.sweep.planning import budget_line, plan_params
from cxrtune.sweep.summary import summarise, trials_table, write_report


@dataclasses.dataclass
class PretrainSweep:
    """What a pretraining sweep script declares."""

    name: str
    method: str
    space: dict[str, Any]
    seed_point: dict[str, Any]
    objective: str = "probe_auroc_20shot"
    description: str = ""
    fixed: dict[str, Any] = dataclasses.field(default_factory=dict)


def build_parser(sweep: PretrainSweep) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python sweeps/{sweep.name}.py",
        description=(sweep.description or f"{sweep.method} sweep") + f"\n\nSearched: {', '.join(sweep.space)}. "
        f"Objective: {sweep.objective} (mean probe AUROC over the findings, maximised).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Profiles:\n" + profile_notes(),
    )
    add_common_arguments(parser, sweep.name)
    add_eval_source_arguments(parser)
    parser.add_argument("--num-samples", type=positive_int, default=None, help="trials to run (default: the profile's)")
    parser.add_argument("--no-report-split", action="store_true", default=None,
                        help="select the best trial and report it against random init on the same episodes (the "
                             "study's protocol); by default the evaluation images are split by patient into "
                             "validation episodes, which choose the winner, and report episodes, on which it is "
                             "reported (each half's CI is about 1.4x wider)")
    parser.add_argument("--cache-size", type=positive_int, default=None, metavar="PX",
                        help="side of the image cache the trials read (default: the profile's: 32 for smoke, 64 for "
                             "default and cpu, 256 for l4 and study); e.g. 256 to train a smoke sweep at 224 px")
    parser.add_argument("--seed", type=int, default=None, help="seed of the Optuna sampler (default: 0)")
    parser.add_argument("--time-budget", type=positive_float, default=None, metavar="MINUTES",
                        help="stop starting trials after this many minutes (running ones are stopped too)")
    parser.add_argument("--budget-hours", type=positive_float, default=None, metavar="H",
                        help="plan the sweep to H wall hours of its resources: a trial's rate is measured first, "
                             "then trials and rungs are chosen to fit; no trial starts and none is promoted that the "
                             "rest of the budget cannot carry to its next rung (default: the profile's budget, 48 "
                             "for l4; the other profiles run their trial count)")
    parser.add_argument("--grace-period", type=positive_int, default=None, metavar="EPOCHS",
                        help="ASHA's first rung, epochs (default: the profile's); widen it where the report's "
                             "'Early judgements' section shows early rungs do not predict the final objective")
    parser.add_argument("--reduction-factor", type=positive_int, default=None, metavar="ETA",
                        help="ASHA's reduction factor: each rung keeps the best 1/ETA (default: the profile's, 2; "
                             "3 for l4)")
    parser.add_argument("--audit-fraction", type=share, default=None, metavar="P",
                        help="pruning audit: this share of the trials ASHA stops (seeded) runs to the full budget "
                             "anyway, tagged audit and left out of the selection; the report measures from them how "
                             "well early rungs predict the final objective (default 0: none)")
    return parser


#: ASHA's reduction factor in the pretraining sweeps (a profile may set its own: ``reduction``)
ASHA_REDUCTION = 2


def asha_settings(profile: Profile, grace: int | None = None, eta: int | None = None) -> tuple[int, int]:
    """(grace period, reduction factor) of a profile's sweeps; those given replace the profile's."""
    return grace or profile.sweep["grace_period"], eta or profile.sweep.get("reduction", ASHA_REDUCTION)


def resolve(sweep: PretrainSweep, profile: str, sets: dict[str, Any], grace: int | None = None,
            eta: int | None = None, budget_hours: float | None = None):
    """A trial's config before the search samples its point (a :class:`cxrtune.resolve.PretrainResolved`);
    its checkpoints fall on ASHA's rungs unless the script or ``--set`` places them, and a budgeted
    sweep (``--budget-hours``, or a profile with a budget) trains on warmup-stable-decay unless they
    choose the schedule."""
    from cxrtune.resolve import resolve_pretrain  # torch and the methods: not for --help

    prof = profile if isinstance(profile, Profile) else get_profile(profile)
    return resolve_pretrain(profile, sweep.method, fixed=sweep.fixed, fixed_origin=f"sweep script {sweep.name}",
                            sets=sets, method_origin=f"sweep script {sweep.name}",
                            asha=asha_settings(prof, grace, eta),
                            budgeted=bool(budget_hours or prof.sweep.get("budget_hours")))


def searched_space(sweep: PretrainSweep, resolved, sets: dict[str, Any]) -> dict[str, Any]:
    """The search space without the keys ``--set`` fixes; a searched key must be a trial's config key."""
    from cxrtune.resolve import DRIVER_KEYS

    for key in sweep.space:
        if key not in resolved.flat:
            raise CxrtuneError(f"search space key {key!r} of sweep {sweep.name} is not a config key of a "
                               f"{sweep.method} trial")
        if key in DRIVER_KEYS:
            raise CxrtuneError(f"search space key {key!r}: the episodes are sampled once per sweep, so it cannot "
                               "be searched; --set it instead")
    return {k: v for k, v in sweep.space.items() if k not in sets}


def describe_domain(domain: Any) -> str:
    """A Tune search domain in words: ``loguniform(0.03, 0.3)``, ``choice([1, 2])``."""
    if hasattr(domain, "categories"):
        return f"choice({list(domain.categories)!r})"
    lower, upper = getattr(domain, "lower", None), getattr(domain, "upper", None)
    if lower is not None and upper is not None:
        sampler = type(getattr(domain, "sampler", None)).__name__.lower()
        kind = "loguniform" if "log" in sampler else "randint" if type(domain).__name__ == "Integer" else "uniform"
        return f"{kind}({lower:g}, {upper:g})"
    if isinstance(domain, dict) and "grid_search" in domain:
        return f"grid({domain['grid_search']!r})"
    return repr(domain)


def print_config(sweep: PretrainSweep, profile: str, sets: dict[str, Any], out=None, grace: int | None = None,
                 eta: int | None = None, budget_hours: float | None = None) -> None:
    resolved = resolve(sweep, profile, sets, grace, eta, budget_hours)
    space = searched_space(sweep, resolved, sets)
    searched = {k: (describe_domain(v), "searched" + (f"; seed point {sweep.seed_point[k]!r}"
                                                      if k in sweep.seed_point else "")) for k, v in space.items()}
    print(resolved.table(f"sweep {sweep.name}, profile {profile}", searched), file=out)


def main(sweep: PretrainSweep, argv: list[str] | None = None) -> int:
    return run_command(sweep, argv, build_parser, run)


def run(sweep: PretrainSweep, args: argparse.Namespace) -> int:
    from cxrtune.sweep.runner import open_sweep

    if args.print_config:
        print_config(sweep, args.profile if args.profile is not None else RECORD_DEFAULTS["profile"], parse_sets(args),
                     grace=args.grace_period, eta=args.reduction_factor, budget_hours=args.budget_hours)
        return 0
    name = args.name if args.name is not None else sweep.name
    record = sweep_record(args)
    if not args.resume:
        record = with_defaults(record)
        resolve(sweep, record["profile"], parse_sets(args), args.grace_period, args.reduction_factor,
                args.budget_hours)  # a bad --set is refused before anything is written
    with open_sweep(name, args.storage, resume=args.resume, tracking_uri=args.tracking_uri, record=record,
                    resume_hint=f"(sweep {name} in {args.storage})") as opened:
        apply_record(args, opened.record)
        if args.resume:
            print(f"resuming sweep {name} ({opened.folder / 'sweep.json'}): profile {args.profile}, "
                  f"source {args.source}" + (f", eval source {args.eval_source}" if args.eval_source else "")
                  + f", tracking {opened.tracking_uri}")
        return _run_open(sweep, args, opened)


def _run_open(sweep: PretrainSweep, args: argparse.Namespace, opened) -> int:
    from ray import tune

    from cxrtune import sweepstate
    from cxrtune.sweep import interrupt
    from cxrtune.sweep.runner import SweepSpec, run_sweep
    from cxrtune.trainables.pretrain import pretrain_trainable

    profile = get_profile(args.profile)
    name, folder = opened.name, opened.folder
    started = time.time()
    sets = parse_sets(args)
    resolved = resolve(sweep, args.profile, sets, args.grace_period, args.reduction_factor, args.budget_hours)
    space = searched_space(sweep, resolved, sets)
    print(f"sweep {name}: profile {args.profile} ({profile.note})")
    probe = resolved.probe
    cache_size = args.cache_size if args.cache_size is not None else profile.cache_size
    data = prepare_data(args, cache_size, profile.phantom,
                        EpisodePlan(tuple(probe.shots), probe.trials, probe.test_negatives), folder,
                        report_split=not args.no_report_split)
    print(data.describe())
    # The data reaches the trials through tune.with_parameters, not the param space: it is neither
    # searched nor a trial's MLflow param (the parent run's data.* params describe it).
    inputs = {"trial.cache": str(data.cache.path), "trial.episodes": str(data.episodes_path),
              "trial.eval_cache": str(data.eval_cache.path), "trial.source": data.source.name,
              "trial.eval_source": data.eval_source.name}
    sweepstate.write_inputs(folder, inputs)
    fixed = resolved.flat
    epochs = int(fixed["train.epochs"])
    points = search_points(sweep, space, fixed, profile.sweep)
    max_concurrent = args.max_concurrent if args.max_concurrent is not None else profile.sweep["max_concurrent"]
    grace, reduction = asha_settings(profile, args.grace_period, args.reduction_factor)
    if reduction < 2:
        raise CxrtuneError(f"--reduction-factor {reduction}: ASHA keeps 1/ETA of the trials at each rung; use 2 or more")
    grace = min(grace, epochs)
    budget_hours = args.budget_hours if args.budget_hours is not None else profile.sweep.get("budget_hours")
    plan = cost = None
    if budget_hours:
        plan, cost = _budget_plan(args, budget_hours, opened, resolved, points[0] if points else {}, data, profile,
                                  epochs, (grace, reduction), max_concurrent)
    spec = SweepSpec(
        name=name, trainable=tune.with_parameters(pretrain_trainable, inputs=inputs),
        param_space={**fixed, **space}, metric=sweep.objective, mode="max",
        num_samples=(plan.trials if plan is not None else
                     args.num_samples if args.num_samples is not None else profile.sweep["num_samples"]),
        max_concurrent=max_concurrent,
        resources={**profile.sweep["resources"], **({"gpu": args.gpu} if args.gpu is not None else {})},
        require_gpu=args.gpu is not None, points_to_evaluate=points,
        seed=args.seed, asha=True, time_budget_s=args.time_budget * 60 if args.time_budget else None,
        max_t=epochs, grace_period=grace, reduction_factor=reduction,
        audit_fraction=args.audit_fraction or 0.0,
        budget_s=plan.budget_hours * 3600 if plan is not None else None, cost=cost,
        tags={"cxrtune.method": sweep.method, "cxrtune.profile": args.profile, "cxrtune.source": data.source.name,
              "cxrtune.eval_source": data.eval_source.name},
        params={**data_params(data), **(plan_params(plan) if plan is not None else {})},
    )
    if not args.verbose:
        print(f"Ray's own output: {folder / CONSOLE_LOG} (--verbose shows it here)")
    results = run_sweep(spec, storage=args.storage, address=args.address, num_cpus=args.cpus,
                        verbose=1 if args.verbose else 0, opened=opened)
    if interrupt.interrupted():
        table = trials_table(results, sweep.objective, sweep.space, interrupt.cut_trials())
        print("\ninterrupted: the sweep's state is saved; trials cut off are 'interrupted' and continue from "
              "their last checkpoint on resume; nothing was exported")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        print(resume_hint(sweep.name, args), file=sys.stderr)
        return 130
    summary = summarise(results, sweep.objective, sweep.space, folder, data,
                        emit=lambda text: print(text, flush=True))
    used = budget_line(folder)
    if used:
        print(used)
    if not args.no_report:
        write_report(name, args.storage, opened)
    print(f"sweep folder: {folder}; wall time {time.time() - started:.0f} s")
    if summary.get("failed"):
        print(f"error: {summary['failed']}", file=sys.stderr)
        return 1
    return 0


def _budget_plan(args, budget_hours: float, opened, resolved, point, data, profile, epochs: int,
                 asha: tuple[int, int], max_concurrent: int):
    """The sweep's budget plan: measured and written for a new sweep, read back on a resume."""
    from cxrtune.sweep.planning import make_plan, measure_cost, read_plan, write_plan

    planned = read_plan(opened.folder) if opened.resume else None
    if planned is None:
        threads = resolved.trial.threads or int(max(1, profile.sweep["resources"].get("cpu", 1)))
        print(f"measuring a trial's rate ({threads} thread(s)) for a plan of {budget_hours:g} hours ...", flush=True)
        cost = measure_cost(resolved, point, data, threads)
        plan = make_plan(budget_hours, cost, epochs, asha[0], asha[1], max_concurrent, args.num_samples)
        write_plan(opened.folder, plan, cost)
    else:
        plan, cost = planned
    print(plan.describe(), flush=True)
    return plan, cost


def search_points(sweep: PretrainSweep, space: dict[str, Any], fixed: dict[str, Any],
                  budget: dict[str, Any]) -> list[dict[str, Any]]:
    """The points Optuna evaluates first: the study's setting (the sweep's seed point), then, for
    a profile with ``profile_point``, the resolved values of the searched keys (the method's preset
    for the profile) when they differ from the study's and lie inside the search space."""
    seed_point = {k: v for k, v in sweep.seed_point.items() if k in space}
    points = [seed_point] if seed_point else []
    if budget.get("profile_point") and space:
        profile_point = {k: fixed[k] for k in space}
        if profile_point != seed_point and all(_in_domain(space[k], v) for k, v in profile_point.items()):
            points.append(profile_point)
    return points


def _in_domain(domain: Any, value: Any) -> bool:
    """Whether a fixed value lies in a Tune search domain (a bound, a category or a constant)."""
    if hasattr(domain, "categories"):
        return value in domain.categories
    lower, upper = getattr(domain, "lower", None), getattr(domain, "upper", None)
    if lower is not None and upper is not None:
        try:
            return lower <= value <= upper
        except TypeError:
            return False
    return domain == value


__all__ = ["PROFILES", "PretrainSweep", "build_parser", "main", "print_config", "resolve", "search_points"]
