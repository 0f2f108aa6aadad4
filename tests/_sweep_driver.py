"""A sweep driver over a synthetic objective, run as a subprocess so tests can kill it.

The trainable writes marker files (starts/<trial>-<iteration>, done/<trial>) so a test can tell
whether a trial was rerun from scratch or continued from its checkpoint.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from ray import tune

from cxrtune.sweep import SweepSpec, run_sweep

ITERATIONS = 6


def synthetic_objective(x: float, iteration: int, crossing: bool = False) -> float:
    """Best at x = 0.3; with ``crossing``, x above 0.3 is worse early and better late (what ASHA
    gets wrong)."""
    objective = 1.0 - (x - 0.3) ** 2 - 0.1 / iteration
    return objective + ((iteration - 3) * (x - 0.3) * 0.2 if crossing else 0.0)


def synthetic_trainable(config):
    markers = Path(config["markers"])
    trial_id = tune.get_context().get_trial_id()
    start = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            start = json.loads((Path(d) / "state.json").read_text())["iteration"]
    (markers / "nodes").mkdir(parents=True, exist_ok=True)
    import ray

    (markers / "nodes" / f"{trial_id}-{ray.get_runtime_context().get_node_id()}").touch()
    (markers / "starts").mkdir(parents=True, exist_ok=True)
    (markers / "starts" / f"{trial_id}-{start}").touch()
    x = config["x"]
    if config.get("diverge_above") is not None and x > config["diverge_above"]:
        tune.report({"objective": 0.0, "trial_status": "diverged", "final": True})
        return
    for iteration in range(start + 1, ITERATIONS + 1):
        time.sleep(config["sleep"])
        if config.get("fail_unseeded") and abs(x - 0.3) > 1e-12 and iteration == 2:
            raise RuntimeError(f"synthetic failure of x={x:.3f} at iteration {iteration}")
        objective = synthetic_objective(x, iteration, bool(config.get("crossing")))
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "state.json").write_text(json.dumps({"iteration": iteration}))
            if config.get("crossing"):
                (Path(d) / "backbone.pt").touch()  # what the best-checkpoint selection looks for
            tune.report({"objective": objective, "final": iteration == ITERATIONS},
                        checkpoint=tune.Checkpoint.from_directory(d))
    (markers / "done").mkdir(parents=True, exist_ok=True)
    (markers / "done" / trial_id).touch()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--storage", required=True)
    parser.add_argument("--uri", required=True)
    parser.add_argument("--markers", required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--sleep", type=float, default=0.5)
    parser.add_argument("--diverge-above", type=float, default=None)
    parser.add_argument("--address", default=None)
    parser.add_argument("--concurrent", type=int, default=2)
    parser.add_argument("--fail-unseeded", action="store_true", help="trials off the seed point raise at iteration 2")
    parser.add_argument("--audit-fraction", type=float, default=None,
                        help="ASHA (grace 1, reduction 2) with this pruning audit; the objective curves cross")
    args = parser.parse_args()
    audit = args.audit_fraction is not None
    spec = SweepSpec(
        name="synthetic",
        trainable=synthetic_trainable,
        param_space={"x": tune.uniform(0.0, 1.0), "markers": args.markers, "sleep": args.sleep,
                     "diverge_above": args.diverge_above, "fail_unseeded": args.fail_unseeded, "crossing": audit},
        metric="objective", mode="max", num_samples=args.samples, max_concurrent=args.concurrent,
        points_to_evaluate=[{"x": 0.3}], seed=0, asha=audit, max_t=ITERATIONS, grace_period=1,
        audit_fraction=args.audit_fraction or 0.0,
    )
    results = run_sweep(spec, resume=args.resume, storage=args.storage, tracking_uri=args.uri,
                        num_cpus=None if args.address else 2, address=args.address)
    from cxrtune.sweep import interrupt

    if interrupt.interrupted():
        print("INTERRUPTED", json.dumps(sorted(interrupt.cut_trials())), flush=True)
        raise SystemExit(130)
    ids = [r.metrics["trial_id"] for r in results]
    print("TRIALS", len(results), "ERRORS", results.num_errors, flush=True)
    print("IDS", json.dumps(ids), flush=True)


if __name__ == "__main__":
    main()
