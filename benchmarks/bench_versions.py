"""The default preset's time per epoch at an earlier commit and now, alternating in one run.

    .venv/bin/python benchmarks/bench_versions.py --rev bd66bcb [--rounds 3] [--epochs 4]
        [--out benchmarks/results/bench_versions.json]

Seconds per epoch on this shared machine change by 2x from day to day and by 20% from one minute to the next,
so a figure from another day says little about the code. This runs benchmarks/bench_train.py of `--rev`
(checked out in a temporary git worktree) and of this working tree one after the other, `--rounds` times
(which goes first alternates), each on the default preset only, both texts, `--epochs` epochs, no baselines,
no recipe timing; the current code without refit (the earlier one had none), so both time the same first
training. Reported per text: every epoch's seconds, and the median over the epochs after the first (the first traces the graphs and
trains with GloVe frozen) of each version, and their ratio (now / then).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def bench_train(tree: Path, data: Path, epochs: int, out: Path, extra: list[str]) -> dict[str, list[float]]:
    """text -> seconds of each epoch of the default preset, from `tree`'s benchmarks/bench_train.py."""
    command = [sys.executable, "benchmarks/bench_train.py", "--data", str(data), "--settings", "distributed,stripped",
               "--presets", "default", "--epochs", str(epochs), "--no-baselines", "--recipe-batches", "0",
               "--out", str(out), *extra]
    subprocess.run(command, cwd=tree, check=True, env={**os.environ, "PYTHONPATH": str(tree)},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    settings = json.loads(out.read_text())["settings"]
    return {text: entry["default"]["seconds_per_epoch"] for text, entry in settings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", required=True, help="the earlier commit")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_versions.json")
    args = parser.parse_args()
    rev = subprocess.run(["git", "rev-parse", "--short", args.rev], cwd=REPO, check=True, capture_output=True,
                         text=True).stdout.strip()
    epochs: dict[str, dict[str, list[float]]] = {"then": {}, "now": {}}
    with tempfile.TemporaryDirectory(prefix="bench-versions-") as scratch:
        then_tree = Path(scratch) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(then_tree), rev], cwd=REPO, check=True,
                       capture_output=True)
        try:
            for round_ in range(args.rounds):
                pair = [("then", then_tree, []), ("now", REPO, ["--set", "refit=false"])]
                for version, tree, extra in pair if round_ % 2 == 0 else pair[::-1]:  # neither always runs first
                    run = bench_train(tree, args.data.resolve(), args.epochs, Path(scratch) / f"{version}.json", extra)
                    for text, seconds in run.items():
                        epochs[version].setdefault(text, []).append(seconds)
                    print(f"round {round_ + 1} {version}: " + ", ".join(f"{t} {s}" for t, s in run.items()), flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(then_tree)], cwd=REPO, check=False)
    result = {"command": f"benchmarks/bench_versions.py --rev {args.rev} --rounds {args.rounds} --epochs {args.epochs}",
              "then": rev, "texts": {}}
    for text in epochs["now"]:
        median = {version: statistics.median(s for run in epochs[version][text] for s in run[1:]) for version in epochs}
        result["texts"][text] = {"seconds_per_epoch": {v: epochs[v][text] for v in epochs},
                                 "median_after_first_epoch": median, "now_over_then": round(median["now"] / median["then"], 3)}
    print(json.dumps(result["texts"], indent=1))
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
