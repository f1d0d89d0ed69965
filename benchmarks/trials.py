"""What a sweep's trial costs beyond its epochs, on the default sweep (pipeline.tune.TrialTimes).

    python benchmarks/trials.py [--set tune.depths=[20]] ... [--out benchmarks/results/trials.json]

Shards the digits into a temporary folder and runs the tune stage with params.yaml's grid and
recipe (8 trials of 45 epochs, as many side by side as the cores fit). Per trial: its wall time
from Tune starting it to its end, the part spent in its epochs (training and val, as the trial's
workers time them) and the rest, the overhead: processes starting and importing, the worker
group, checkpoints, MLflow, Tune.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import ray

from pipeline import params, shard, tune

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a params.yaml override")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "trials.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        p = params.load(
            REPO / "params.yaml",
            [
                f"paths.shards={tmp}/shards",
                f"paths.ray_storage={tmp}/ray",
                f"paths.reports={tmp}/reports",
                f"paths.metrics={tmp}/metrics",
                f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
                *args.set,
            ],
        )
        shard.shard(p)
        started = time.monotonic()
        try:
            sweep = tune.sweep(p)
        finally:
            ray.shutdown()
        sweep_s = time.monotonic() - started
    rows = [
        {
            "trial": t.trial.label,
            "epochs": t.epochs,
            "wall_s": t.wall_time_s,
            "epochs_s": t.wall_time_s - t.overhead_s,
            "overhead_s": t.overhead_s,
        }
        for t in sweep.finished
    ]
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "overrides": args.set,
        "sweep_s": sweep_s,
        "failed_trials": len(sweep.failed),
        "median_overhead_s": statistics.median(r["overhead_s"] for r in rows),
        "max_overhead_s": max(r["overhead_s"] for r in rows),
        "trials": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'trial':<22} {'epochs':>6} {'wall':>8} {'in epochs':>10} {'overhead':>9}")
    for r in rows:
        print(f"{r['trial']:<22} {r['epochs']:>6} {r['wall_s']:7.1f}s {r['epochs_s']:9.1f}s {r['overhead_s']:8.1f}s")
    print(f"overhead a trial: median {result['median_overhead_s']:.1f} s, at most {result['max_overhead_s']:.1f} s")
    print(f"sweep: {sweep_s:.0f} s; wrote {out}")


if __name__ == "__main__":
    main()
