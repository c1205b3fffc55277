"""How much each validation slice looks like 20news-bydate's test split, measured by shared threads.

    .venv/bin/python benchmarks/bench_slices.py [--data ../shared/data] [--out benchmarks/results/bench_slices.json]

A thread is a post's Subject without its "Re:" prefixes, within its group. For each validation slice the
train step can hold out (train.validation = latest or random, 10%, seed 1337), the share of its posts whose
thread also has a post among the training posts beside it; for the test split, the share whose thread has
a post in the training split. A slice that shares more threads than the test split flatters the words of a
thread (names, subjects, quoted lines), which a later test split mostly does not repeat.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tasks.model.training import validation_split  # noqa: E402
from tasks.train import posting_order  # noqa: E402

REPLY = re.compile(r"^\s*((re|fwd?)\s*(\[\d+\])?\s*:\s*)+", re.I)


def threads(archive: Path) -> dict[str, list[tuple[str, str, str]]]:
    """split -> [(group, file name, thread)] from the 20news-bydate archive."""
    out: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if not member.isfile():
                continue
            split, group, name = member.name.split("/")[-3:]
            text = tar.extractfile(member).read().decode("latin-1")
            subject = re.search(r"^Subject:(.*)$", text, re.M)
            thread = REPLY.sub("", subject.group(1).strip()).strip().lower() if subject else ""
            out[split.rsplit("-", 1)[-1]].append((group, name, thread))
    return out


def shared(posts: list[tuple[str, str]], beside: list[tuple[str, str]]) -> float:
    """Share of (group, thread) posts whose thread has a post in `beside` within the same group."""
    known = set(beside)
    return float(np.mean([post in known for post in posts]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_slices.json")
    args = parser.parse_args()
    split = threads(args.data / "20news-bydate.tar.gz")
    train, test = split["train"], split["test"]
    groups = sorted({g for g, _, _ in train})
    labels = np.array([groups.index(g) for g, _, _ in train])
    posts = [(g, t) for g, _, t in train]
    order = posting_order([f"train/{g}/{name}" for g, name, _ in train])
    result = {"command": "benchmarks/bench_slices.py", "posts": {"train": len(train), "test": len(test)},
              "test_shares_thread_with_train": shared([(g, t) for g, _, t in test], posts)}
    for mode in ("latest", "random"):
        fit, val = validation_split(labels, 0.1, 1337, mode, order)
        result[f"{mode}_slice_shares_thread_with_fit"] = shared([posts[i] for i in val], [posts[i] for i in fit])
    print(json.dumps(result, indent=1))
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
