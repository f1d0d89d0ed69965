"""What every stage shares at its edge: `--params FILE --set KEY=VALUE ...`, and one clear
line plus exit code 2 for bad input (1 for an MLflow store that stayed away)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from pipeline import params
from pipeline.errors import TrackingUnavailable, UsageError
from pipeline.params import Params


def parse(stage: str, description: str, argv: Sequence[str] | None = None) -> Params:
    parser = argparse.ArgumentParser(prog=f"python -m pipeline.{stage}", description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one dotted key, value parsed as YAML (repeatable), e.g. --set train.epochs=2",
    )
    args = parser.parse_args(argv)
    return params.load(args.params, args.overrides)


def run(main: Callable[[], object]) -> None:
    """Run a stage's main(); a UsageError becomes one line on stderr and exit code 2, a store
    that stayed away past its retries one line and exit code 1."""
    try:
        main()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrackingUnavailable as e:
        print(f"error: {e}; start it (or point MLFLOW_TRACKING_URI at one that answers) and rerun", file=sys.stderr)
        sys.exit(1)
