"""How much each validation slice looks like 20news-bydate's test split, measured by shared threads.

    .venv/bin/python benchmarks/bench_slices.py [--data ../shared/data] [--out benchmarks/results/bench_slices.json]
        [--sweeps benchmarks/results/cand_*.json ...]

A thread is a post's Subject without its "Re:" prefixes, within its group. For each validation slice the
train step can hold out (train.validation = latest or random, 10%, seed 1337), the share of its posts whose
thread also has a post among the training posts beside it; for the test split, the share whose thread has
a post in the training split. A slice that shares more threads than the test split flatters the words of a
thread (names, subjects, quoted lines), which a later test split mostly does not repeat.

--sweeps: bench_sweep.py result files whose runs trained with refit off (so their models never saw the slice);
each run's model is scored again on the latest slice split in two, the posts that continue a thread seen in
training and those that start a new one (the test split is not read). Per config: mean and sample standard
deviation over the runs.
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

from storage.artifacts import ArtifactStore  # noqa: E402
from storage.schemas import SEQUENCES  # noqa: E402
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


def slice_predictions(sweep_file: Path):
    """Each refit-off run of a sweep result, scored on the latest validation slice (the test split is not read):
    yields (config, seed, slice document ids, labels, experts' probabilities (documents, experts, classes), expert
    weights). Shared with benchmarks/bench_members.py."""
    from tasks.model.model import expert_probabilities, load_model

    sweep = json.loads(sweep_file.read_text())["sweep"]
    store, tokens = ArtifactStore(sweep["data_home"]), {}
    for run in sweep["runs"]:
        ref = store.find("train", run["steps"]["train"]["key"])
        manifest = store.read_manifest(ref)
        if manifest["params"]["refit"]:
            continue
        source = next(store.find(u["step"], u["key"]) for u in manifest["upstream"] if u["step"] == "tokens")
        if source.key not in tokens:
            table = store.read_parquet(source, "sequences.parquet", SEQUENCES).to_pandas()
            table = table[table.split == "train"].reset_index(drop=True)
            tokens[source.key] = ([np.asarray(x) for x in table.ids], table.label.to_numpy(), list(table.doc_id),
                                  posting_order(list(table.doc_id)))
        sequences, labels, docs, order = tokens[source.key]
        fit, val = validation_split(labels, 0.1, manifest["params"]["seed"], "latest", order)
        classifier = load_model(store.local_file(ref, "model.keras"))
        weights = np.asarray(classifier.get_layer("expert_product").expert_weights)
        experts = expert_probabilities(classifier, [sequences[i] for i in val], max(len(x) for x in sequences))
        yield run["config"], manifest["params"]["seed"], [docs[i] for i in val], labels[val], experts, weights, \
            {docs[i] for i in fit}


def mean_std(values) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def rescore(sweep_file: Path, train_threads: dict[str, str]) -> dict[str, dict]:
    """Each refit-off run of a sweep result, on the latest slice: accuracy on continuing and on new threads."""
    from tasks.model.expert_product import product_probabilities

    rows = defaultdict(list)
    for config, _, docs, labels, experts, weights, fit_docs in slice_predictions(sweep_file):
        thread = lambda doc: (doc.split("/")[1], train_threads[doc])  # noqa: E731
        seen = {thread(doc) for doc in fit_docs}
        new = np.array([thread(doc) not in seen for doc in docs])
        hit = product_probabilities(experts, weights).argmax(-1) == labels
        lstm_hit = experts[:, 0].argmax(-1) == labels
        rows[config].append({"continuing": hit[~new].mean(), "new": hit[new].mean(),
                             "new_lstm": lstm_hit[new].mean(), "new_share": new.mean()})
    return {config: {f"{name}_{stat}": value for name in runs[0]
                     for stat, value in zip(("mean", "std"), mean_std([r[name] for r in runs]), strict=True)}
            | {"runs": len(runs)} for config, runs in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_slices.json")
    parser.add_argument("--sweeps", type=Path, nargs="*", default=[], help="bench_sweep.py result files (refit off)")
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
    if args.sweeps:
        result["command"] += " --sweeps " + " ".join(f"benchmarks/results/{f.name}" for f in args.sweeps)
        by_doc = {f"train/{g}/{name}": t for g, name, t in train}
        result["latest_slice_by_thread"] = {f"{f.name}: {config}": row for f in args.sweeps
                                            for config, row in rescore(f, by_doc).items()}
    print(json.dumps(result, indent=1))
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
