"""The shards on disk once: after `make repro`, the bytes of the shards and of DVC's cache
together, each file once, against the shards' own.

    make repro && .venv/bin/python -m benchmarks.stored_once [--out benchmarks/results/stored_once.json]

`.dvc/config` links DVC's cache into the workspace (hard links, else symlinks), so the two share
their files: the ratio is about 1.0, where DVC's default (a copy) makes it about 2. Allocated
blocks are counted (`pipeline.files.disk_bytes`), not file lengths.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path

from pipeline import params
from pipeline.files import disk_bytes

REPO = Path(__file__).resolve().parent.parent


def is_unlinked_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink() and path.lstat().st_nlink == 1


def measure(repo: Path) -> dict:
    shards = repo / params.load(repo / "params.yaml").paths.shards
    cache = repo / ".dvc" / "cache"
    if not (shards / "manifest.json").exists():
        raise SystemExit(f"error: no shards at {shards}: run `make repro` first")
    files = [path for path in shards.rglob("*") if path.is_file() and not path.is_symlink()]
    links = [os.lstat(path).st_nlink for path in files]
    alone, together = disk_bytes(shards), disk_bytes(shards, cache)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
    )
    return {
        "commit": commit.stdout.strip(),
        "shards": str(shards.relative_to(repo)),
        "shard_bytes": alone,
        "cache_bytes": disk_bytes(cache),
        "shards_and_cache_bytes": together,
        "ratio": round(together / alone, 4),
        # What only the cache holds (DVC's directory listings, its run cache): the rest of it is
        # files of the workspace, the shards and other stages' cached outputs (report's pictures).
        "cache_only_bytes": sum(path.lstat().st_blocks * 512 for path in cache.rglob("*") if is_unlinked_file(path)),
        "shard_files": len(files),
        "shard_files_linked_from_the_cache": sum(n > 1 for n in links),
        "shard_symlinks": sum(1 for path in shards.rglob("*") if path.is_symlink()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repo", default=str(REPO), help="the checkout `make repro` ran in")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "stored_once.json"))
    args = parser.parse_args()
    result = measure(Path(args.repo).resolve())
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"shards {result['shard_bytes'] / 1e6:.1f} MB, shards and DVC cache {result['shards_and_cache_bytes'] / 1e6:.1f} MB: "
        f"{result['ratio']:.3f}x; wrote {args.out}"
    )


if __name__ == "__main__":
    main()
