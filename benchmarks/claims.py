"""Are the paper's claims robust on the default run, or lucky? The default sweep, once per seed.

    python -m benchmarks.claims [--seeds 0 1 2] [--out benchmarks/results/claims.json]

For each `train.seed` (the initial weights, the shard order and every augmentation draw), runs
the `tune` stage with params.yaml as it is, in a scratch folder (its own MLflow store and Ray
storage), then the report's claims (`pipeline.claims`) on the sweep's records. Writes
every claim's verdict and evidence per seed, and each trial's final train and best val error,
to the JSON file, and prints a table. The shards are made once (the data split does not move
with `train.seed`). A seed whose claims do not all hold is printed as such: the default run is
meant to show the paper's picture for every seed, not one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.claims import claims
from pipeline.records import read_sweep

REPO = Path(__file__).resolve().parent.parent


def stage(name: str, work: Path, *overrides: str) -> None:
    """`python -m pipeline.<name>` with params.yaml, its outputs redirected under `work`."""
    paths = [
        f"paths.shards={work / 'shards'}",
        f"paths.ray_storage={work / 'ray'}",
        f"paths.metrics={work / 'metrics'}",
        *overrides,
    ]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    command = [sys.executable, "-m", f"pipeline.{name}", *[x for o in paths for x in ("--set", o)]]
    subprocess.run(command, cwd=REPO, env=env, check=True)


def one_seed(work: Path, seed: int) -> dict:
    reports = work / f"seed-{seed}"
    started = time.perf_counter()
    stage("tune", work, f"train.seed={seed}", f"paths.reports={reports}")
    wall = time.perf_counter() - started
    sweep = read_sweep(str(reports))
    return {
        "seed": seed,
        "tune_wall_time_s": round(wall, 1),
        "claims": [c.model_dump(mode="json") for c in claims(sweep.trials)],
        "trials": [
            {
                "trial": t.trial.label,
                "final_train_top1_error": getattr(t, "final_train_top1_error", None),
                "best_val_top1_error": getattr(t, "best_val_top1_error", None),
                "error": getattr(t, "error", None),
            }
            for t in sweep.trials
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "claims.json")
    args = parser.parse_args()

    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="claims-") as tmp:
        work = Path(tmp)
        stage("shard", work)
        for seed in args.seeds:
            runs.append(one_seed(work, seed))
            print(f"seed {seed}: tune {runs[-1]['tune_wall_time_s']:.0f} s", flush=True)
            for claim in runs[-1]["claims"]:
                verdict = {True: "held", False: "NOT HELD", None: "not tested"}[claim["held"]]
                print(f"  {verdict:10}  {claim['claim']}", flush=True)
            write(args.out, runs)  # after every seed: a long run stopped halfway keeps what it did


def write(out: Path, runs: list[dict]) -> None:
    all_held = all(c["held"] is True for run in runs for c in run["claims"])
    result = {
        "command": "python -m benchmarks.claims " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "seeds_done": [run["seed"] for run in runs],
        "all_claims_held_for_every_seed": all_held,
        "runs": runs,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"every claim held for every seed so far: {all_held}; wrote {out}", flush=True)


if __name__ == "__main__":
    main()
