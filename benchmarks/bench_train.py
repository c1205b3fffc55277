"""Training + evaluation on the real data: our presets vs TF-IDF baselines, and time per epoch vs the original recipe.

    .venv/bin/python benchmarks/bench_train.py [--data ../shared/data] [--settings distributed,stripped]
        [--presets default,seed] [--backend tensorflow|jax|torch] [--epochs N] [--recipe-batches 8]
        [--export-dir DIR] [--from-dir DIR] [--out benchmarks/results/bench_train.json]

Data: 20news-bydate (train/test split as distributed) and GloVe 6B 50d from --data, checked against
the sha256 values of shared/data/README.md, prepared by the project's own pure functions
(tasks.corpus.build_documents, tasks.tokens, tasks.glove.read_glove_zip, tasks.embeddings).
Two settings: the text as distributed, and with headers, footers and quotes stripped.

For each setting: test accuracy and macro-F1 of each preset (tasks.model.fit_classifier, the code the
`train` step runs; early stopping on a slice of the training split only), next to TF-IDF + LinearSVC
and TF-IDF + LogisticRegression (sublinear TF-IDF over the same token ids the models read).

Speed: seconds per epoch of each preset (measured: every epoch, including its validation pass and
checkpoint; median over epochs) vs the original recipe's model (Embedding -> LSTM(100, dropout=0.2,
recurrent_dropout=0.2) -> Dense(1, sigmoid) -> Dense(20, softmax), every sequence padded to 1,000,
batch 32): that one is timed on --recipe-batches batches, in chunks before, between and after our
trainings (the machine is shared: contention changes by 2x within minutes), and its median batch
time is EXTRAPOLATED to one epoch over the same training documents.

GPU machines without Prefect/TensorFlow/pydantic: prepare here with --export-dir DIR (numpy .npz, ids
uint16 and matrices float16, well under 40 MB), copy DIR, and run there with --from-dir DIR
--backend torch (or jax); that path imports only keras, numpy, tasks.model and (if present) sklearn.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHA256 = {
    "20news-bydate.tar.gz": "53027b79f71f27034d8d89a5b453d614685f400af36370c9df8766299899ec78",
    "glove.6B.zip": "a91fc13449f05cce32e3752c5e0b8b7a9e1a948063e6222e43b8320682ab0c1d",
}
SETTINGS = {"distributed": (), "stripped": ("headers", "footers", "quotes")}
RECIPE = {"num_words": 20_000, "max_length": 1000, "units": 100, "batch_size": 32}


def log(*parts) -> None:
    print(time.strftime("%H:%M:%S"), *parts, flush=True)


# -- data ------------------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def prepare(data_dir: Path, settings: list[str], tokenizers: set[tuple[int, str, bool]], dev: bool = False) -> tuple[dict, dict]:
    """{(setting, num_words, truncation, split_contractions): arrays} built with the project's pure step functions, and the configs used.

    dev=True: the test split is left out altogether and each group's latest 10% of training posts is scored
    instead, so that settings are compared without ever looking at the test split.
    """
    import pyarrow.parquet as pq

    from storage.files import Staging
    from tasks.config import CorpusConfig, EmbeddingsConfig, TokenizeConfig
    from tasks.corpus import build_documents
    from tasks.embeddings import embedding_matrix
    from tasks.glove import read_glove_zip
    from tasks.model.training import validation_split
    from tasks.tokenizer import encode, fit_vocabulary, rules_of, split_words
    from tasks.train import posting_order

    for name, expected in SHA256.items():
        got = sha256(data_dir / name)
        if got != expected:
            raise SystemExit(f"{data_dir / name}: sha256 {got}, expected {expected} (shared/data/README.md)")
    started = time.perf_counter()
    vectors, _ = read_glove_zip(data_dir / "glove.6B.zip", 50)
    log(f"GloVe 50d parsed: {vectors.num_rows} words, {time.perf_counter() - started:.1f} s")
    prepared, configs = {}, {}
    embeddings_cfg = EmbeddingsConfig()
    for setting in settings:
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as scratch:
            build_documents(data_dir / "20news-bydate.tar.gz", CorpusConfig(strip=SETTINGS[setting]), Staging(Path(scratch)))
            documents = pq.read_table(Path(scratch) / "documents.parquet")
        if dev:
            documents = documents.filter(np.asarray(documents["split"].to_pylist()) == "train")
        texts = documents["text"]
        is_test = np.asarray(documents["split"].to_pylist()) == "test"
        if dev:
            labels = documents["label"].to_numpy()
            is_test[validation_split(labels, 0.1, 0, "latest", posting_order(documents["doc_id"].to_pylist()))[1]] = True
        order = posting_order(documents["doc_id"].to_pylist())
        for num_words, truncation, contractions in sorted(tokenizers):
            cfg = TokenizeConfig(num_words=num_words, max_length=RECIPE["max_length"], truncation=truncation,
                                 split_contractions=contractions)
            rules = rules_of(cfg)
            vocab, _ = fit_vocabulary([texts.filter(~is_test)], rules, cfg.num_words)
            ids, _ = encode(split_words(texts, rules), vocab, rules)
            matrix, hit = embedding_matrix(vocab, vectors, embeddings_cfg.oov_init, embeddings_cfg.seed)
            prepared[(setting, num_words, truncation, contractions)] = {
                "offsets": ids.offsets.to_numpy().astype(np.int64),
                "ids": ids.values.to_numpy(zero_copy_only=False).astype(np.int32),
                "labels": documents["label"].to_numpy().astype(np.int16),
                "is_test": is_test,
                "order": order,
                "matrix": matrix,
                "groups": sorted(set(documents["group"].to_pylist())),
            }
            configs[dataset_name(setting, num_words, truncation, contractions)] = {"tokenize": cfg.model_dump(), "embeddings": embeddings_cfg.model_dump(),
                                                  "glove_hit_rate": round(float(hit[1:].mean()), 4)}
        log(f"{setting}: {documents.num_rows} documents tokenized for {sorted(tokenizers)}, {time.perf_counter() - started:.1f} s")
    return prepared, configs


def export(prepared: dict, configs: dict, train_configs: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for key, d in prepared.items():
        ids_dtype = np.uint16 if d["matrix"].shape[0] <= 65536 else np.int32
        np.savez_compressed(out / f"{dataset_name(*key)}.npz", offsets=d["offsets"], ids=d["ids"].astype(ids_dtype),
                            labels=d["labels"], is_test=d["is_test"], order=d["order"], matrix=d["matrix"].astype(np.float16),
                            groups=np.array(d["groups"]))
    manifest = {"datasets": sorted(dataset_name(*key) for key in prepared), "configs": configs, "train_presets": train_configs,
                "note": "ids uint16, matrix float16 (GloVe rounded to ~3 significant digits)"}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    size = sum(p.stat().st_size for p in out.iterdir())
    log(f"exported {len(prepared)} datasets to {out}: {size / 1e6:.1f} MB")


def load_exported(src: Path) -> tuple[dict, dict]:
    manifest = json.loads((src / "manifest.json").read_text())
    prepared = {}
    for name in manifest["datasets"]:
        setting, words, truncation, *rest = name.split("-")
        with np.load(src / f"{name}.npz") as z:
            prepared[(setting, int(words[1:]), truncation, rest == ["gc"])] = {
                "offsets": z["offsets"], "ids": z["ids"].astype(np.int32), "labels": z["labels"], "is_test": z["is_test"],
                "order": z["order"] if "order" in z else None,
                "matrix": z["matrix"].astype(np.float32), "groups": [str(g) for g in z["groups"]],
            }
    return prepared, manifest


def dataset_name(setting: str, num_words: int, truncation: str, split_contractions: bool = False) -> str:
    return f"{setting}-w{num_words}-{truncation}" + ("-gc" if split_contractions else "")


def sequences_of(d: dict) -> list[np.ndarray]:
    offsets = d["offsets"]
    return np.split(d["ids"][offsets[0]: offsets[-1]], offsets[1:-1] - offsets[0])


# -- configs (pydantic when available, the exported dump otherwise) ------------------------------------
TOKENIZER_FIELDS = ("num_words", "truncation", "split_contractions")


def tokenizer_of(cfg: dict) -> tuple[int, str, bool]:
    return cfg["num_words"], cfg.get("truncation", "head"), bool(cfg.get("split_contractions", False))


def train_configs(presets: list[str], epochs: int | None, exported: dict | None, overrides: list[str] = ()) -> dict:
    try:
        from tasks.config import PipelineConfig, with_preset
    except ImportError:  # GPU machine without pydantic: the presets as exported
        if not exported:
            raise
        resolved = {p: dict(exported["train_presets"][p]) for p in presets}
    else:
        resolved = {}
        for p in presets:
            cfg = with_preset(PipelineConfig(), p)
            resolved[p] = {**cfg.train.model_dump(), **{f: getattr(cfg.tokenize, f) for f in TOKENIZER_FIELDS}}
    changes = {"epochs": epochs} if epochs else {}
    for item in overrides:
        field, _, value = item.partition("=")
        field = field.removeprefix("train.").removeprefix("tokenize.")
        if field not in next(iter(resolved.values()), {}):
            raise SystemExit(f"--set {item}: unknown training field {field!r}")
        changes[field] = json.loads(value)
    for cfg in resolved.values():
        cfg.update(changes)
    return resolved


# -- metrics and baselines ------------------------------------------------------------------------------
def scores(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> dict:
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (y_true, y_pred), 1)
    tp = np.diag(confusion).astype(float)
    precision = np.divide(tp, confusion.sum(0), out=np.zeros(n), where=confusion.sum(0) > 0)
    recall = np.divide(tp, confusion.sum(1), out=np.zeros(n), where=confusion.sum(1) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(n), where=precision + recall > 0)
    return {"accuracy": round(float(tp.sum() / confusion.sum()), 4), "macro_f1": round(float(f1.mean()), 4)}


def baselines(d: dict, sequences: list[np.ndarray]) -> dict:
    """TF-IDF + LinearSVC and + logistic regression over the token ids of `d` (its matrix rows = vocabulary + 1)."""
    return tfidf_baselines(sequences, d["labels"], d["is_test"], len(d["matrix"]), len(d["groups"]))


def tfidf_baselines(sequences: list[np.ndarray], labels: np.ndarray, is_test: np.ndarray, vocab_rows: int, n_classes: int) -> dict:
    try:
        import scipy.sparse as sp
        from sklearn.feature_extraction.text import TfidfTransformer
        from sklearn.linear_model import LogisticRegression
        from sklearn.svm import LinearSVC
    except ImportError:
        log("sklearn not installed: baselines skipped")
        return {}
    rows = np.repeat(np.arange(len(sequences)), [len(s) for s in sequences])
    counts = sp.csr_matrix((np.ones(len(rows)), (rows, np.concatenate(sequences))), shape=(len(sequences), vocab_rows))
    counts.sum_duplicates()
    train, test, y = ~is_test, is_test, labels.astype(np.int64)
    features = TfidfTransformer(sublinear_tf=True).fit(counts[train]).transform(counts)
    out = {}
    for name, model in (("tfidf_linearsvc", LinearSVC()), ("tfidf_logreg", LogisticRegression(C=10.0, max_iter=1000))):
        started = time.perf_counter()
        predicted = model.fit(features[train], y[train]).predict(features[test])
        out[name] = {**scores(y[test], predicted, n_classes), "seconds": round(time.perf_counter() - started, 1)}
        log(f"  {name}: {out[name]}")
    return out


# -- the models -------------------------------------------------------------------------------------------
def train_preset(name: str, cfg: dict, d: dict, sequences: list[np.ndarray]) -> dict:
    """Train one preset on the training split (its validation slice per cfg["validation"]), score it on the test split."""
    from storage.checkpoints import CheckpointDir
    from tasks.model import fit_classifier, predict_proba

    train_rows = np.flatnonzero(~d["is_test"])
    test_rows = np.flatnonzero(d["is_test"])
    labels = d["labels"].astype(np.int32)
    with tempfile.TemporaryDirectory(prefix=f"bench-train-{name}-") as work:
        started = time.perf_counter()
        classifier, history, summary = fit_classifier(
            SimpleNamespace(**cfg), [sequences[i] for i in train_rows], labels[train_rows], d["matrix"], len(d["groups"]),
            RECIPE["max_length"], CheckpointDir(work), _Printer(),
            order=None if d.get("order") is None else d["order"][train_rows],
        )
        train_seconds = time.perf_counter() - started
    started = time.perf_counter()
    test_sequences = [sequences[i] for i in test_rows]
    probabilities = predict_proba(classifier, test_sequences, RECIPE["max_length"])
    predict_seconds = time.perf_counter() - started
    result = scores(labels[test_rows], probabilities.argmax(1), len(d["groups"]))
    if summary["expert_weights"] and len(summary["expert_weights"]) > 1:  # each expert on its own, for the record
        from tasks.model import expert_probabilities

        expert_probs = expert_probabilities(classifier, test_sequences, RECIPE["max_length"])
        result["expert_accuracy"] = [round(float((expert_probs[:, e].argmax(1) == labels[test_rows]).mean()), 4)
                                     for e in range(expert_probs.shape[1])]
    epochs = summary["seconds_per_epoch"]
    result.update(
        train_seconds=round(train_seconds, 1), predict_seconds=round(predict_seconds, 1),
        epochs_run=summary["epochs_run"], best_epoch=summary["best_epoch"], stopped_early=summary["stopped_early"],
        seconds_per_epoch=epochs, median_seconds_per_epoch=round(statistics.median(epochs), 2) if epochs else None,
        expert_weights=summary["expert_weights"], backend=summary["backend"], device=summary["device_name"],
        best_val_accuracy=round(summary["best_val_accuracy"], 4), validation=summary.get("validation"),
        expert_val_accuracy=history[summary["best_epoch"] - 1]["expert_val_accuracy"] if history else None,
        train_documents=summary["train_documents"], validation_documents=summary["validation_documents"],
    )
    log(f"  {name}: validation accuracy {result['best_val_accuracy']} (experts {result['expert_val_accuracy']}); "
        f"test accuracy {result['accuracy']}, macro-F1 {result['macro_f1']}, "
        f"{result['median_seconds_per_epoch']} s/epoch (median of {len(epochs)}), {result['train_seconds']} s training"
        + (f"; experts alone {result['expert_accuracy']}" if "expert_accuracy" in result else ""))
    return result


class _Printer:
    """A logger stand-in that prints fit_classifier's per-epoch lines."""

    def info(self, msg, *args):
        log("   ", msg % args)

    warning = info


class RecipeTimer:
    """The original recipe's model on batches of 32 sequences pre-padded to 1,000, timed in chunks.

    The chunks are spread over the run (before, between and after our trainings), so the recipe and
    our epochs see the same CPU contention from whatever else the machine is doing.
    """

    def __init__(self, d: dict, sequences: list[np.ndarray]):
        import keras
        from keras import layers

        keras.utils.set_random_seed(0)
        words, self.length, self.batch = RECIPE["num_words"], RECIPE["max_length"], RECIPE["batch_size"]
        self.model = keras.Sequential([
            keras.Input((self.length,), dtype="int32"),
            layers.Embedding(words + 1, d["matrix"].shape[1], trainable=False),
            layers.LSTM(RECIPE["units"], dropout=0.2, recurrent_dropout=0.2),
            layers.Dense(1, activation="sigmoid"),
            layers.Dense(len(d["groups"]), activation="softmax"),
        ])
        self.model.layers[0].set_weights([d["matrix"][: words + 1]])
        self.model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
        self.rng = np.random.default_rng(0)
        self.rows = np.flatnonzero(~d["is_test"])
        self.labels, self.sequences = d["labels"].astype(np.int32), sequences
        self.seconds: list[float] = []
        self.model.train_on_batch(*self._batch())  # build + trace: not timed

    def _batch(self):  # Keras pad_sequences defaults: pad and truncate at the front
        rows = self.rng.choice(self.rows, self.batch)
        x = np.zeros((len(rows), self.length), dtype=np.int32)
        for r, i in enumerate(rows):
            s = self.sequences[i][-self.length:]
            if len(s):
                x[r, -len(s):] = s
        return x, self.labels[rows]

    def sample(self, batches: int) -> None:
        for _ in range(batches):
            x, y = self._batch()
            started = time.perf_counter()
            self.model.train_on_batch(x, y)
            self.seconds.append(time.perf_counter() - started)

    def summary(self, train_documents: int) -> dict:
        steps = math.ceil(train_documents / self.batch)
        median, best = statistics.median(self.seconds), min(self.seconds)
        log(f"  original recipe: {median:.3f} s per batch of {self.batch} (median of {len(self.seconds)} timed batches, "
            f"min {best:.3f}) -> {median * steps:.0f} s per epoch of {train_documents} documents (extrapolated)")
        return {"seconds_per_batch": [round(t, 4) for t in self.seconds], "median_seconds_per_batch": round(median, 4),
                "min_seconds_per_batch": round(best, 4), "batches_timed": len(self.seconds), "train_documents": train_documents,
                "extrapolated_seconds_per_epoch": round(median * steps, 1), "extrapolated_min_seconds_per_epoch": round(best * steps, 1)}


# -- main --------------------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--settings", default="distributed,stripped")
    parser.add_argument("--presets", default="default,seed")
    parser.add_argument("--backend", choices=("tensorflow", "jax", "torch"), help="KERAS_BACKEND (default: as set, else tensorflow)")
    parser.add_argument("--epochs", type=int, help="override every preset's epochs (e.g. for a quick look)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a training field of every preset, e.g. --set lstm_max_tokens=256 (JSON values)")
    parser.add_argument("--recipe-batches", type=int, default=12,
                        help="batches of the original recipe timed, in chunks before/between/after the presets (0: skip)")
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--dev", action="store_true",
                        help="leave the test split out; score each group's latest 10%% of training posts instead (for choosing settings)")
    parser.add_argument("--export-dir", type=Path, help="save the prepared arrays here (for a machine without the data layer)")
    parser.add_argument("--export-only", action="store_true", help="with --export-dir: prepare, export and stop")
    parser.add_argument("--from-dir", type=Path, help="load arrays saved by --export-dir instead of preparing them")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_train.json")
    args = parser.parse_args()
    if args.backend:
        os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    settings = [s for s in args.settings.split(",") if s]
    presets = [p for p in args.presets.split(",") if p]
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        parser.error(f"unknown settings {unknown}; choose from {sorted(SETTINGS)}")

    exported = None
    if args.from_dir:
        prepared, exported = load_exported(args.from_dir)
        configs = train_configs(presets, args.epochs, exported, args.set)
        data_configs = exported["configs"]
    else:
        configs = train_configs(presets, args.epochs, None, args.set)
        tokenizers = {tokenizer_of(c) for c in configs.values()}
        if args.export_dir:  # export every preset's tokens, so the GPU run can pick any
            tokenizers |= {tokenizer_of(c) for c in train_configs(["default", "seed"], None, None).values()}
        if not any(words == RECIPE["num_words"] for words, _, _ in tokenizers):
            tokenizers.add((RECIPE["num_words"], "tail", False))
        prepared, data_configs = prepare(args.data, settings, tokenizers, args.dev)
        if args.export_dir:
            export(prepared, data_configs, train_configs(["default", "seed"], None, None), args.export_dir)
            if args.export_only:
                return 0

    import keras

    results = {"machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                           "keras": keras.__version__, "backend": keras.config.backend()},
               "command": " ".join(sys.argv), "presets": configs, "data": data_configs, "settings": {},
               "scored_on": "latest 10% of the training split (--dev)" if args.dev else "test split"}
    for setting in settings:
        log(f"== {setting}")
        entry = results["settings"][setting] = {}
        if not args.no_baselines:
            d = prepared[(setting, *tokenizer_of(configs[presets[0]]))] if presets else None
            entry["baselines"] = baselines(d, sequences_of(d)) if d else {}
        recipe_data = [key for key in prepared if key[:2] == (setting, RECIPE["num_words"])]
        timer = RecipeTimer(prepared[recipe_data[0]], sequences_of(prepared[recipe_data[0]])) if args.recipe_batches and recipe_data else None
        chunk = max(1, args.recipe_batches // (len(presets) + 1))
        if timer:
            timer.sample(chunk)
        for preset in presets:
            cfg = configs[preset]
            d = prepared[(setting, *tokenizer_of(cfg))]
            train_cfg = {k: v for k, v in cfg.items() if k not in TOKENIZER_FIELDS}
            entry[preset] = train_preset(preset, train_cfg, d, sequences_of(d))
            if timer:
                timer.sample(chunk)
        if timer:
            reference = next((entry[p] for p in presets), None)
            documents = reference["train_documents"] if reference else int((~prepared[recipe_data[0]]["is_test"]).sum())
            recipe = entry["original_recipe"] = timer.summary(documents)
            for preset in presets:
                ours = entry[preset]["seconds_per_epoch"]
                if ours:
                    entry[preset]["speedup_vs_original_recipe"] = round(recipe["extrapolated_seconds_per_epoch"] / statistics.median(ours), 1)
                    entry[preset]["speedup_min_vs_min"] = round(recipe["extrapolated_min_seconds_per_epoch"] / min(ours), 1)

    print_table(results, presets)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    log(f"wrote {args.out}")
    return 0


def print_table(results: dict, presets: list[str]) -> None:
    print(f"\nbackend {results['machine']['backend']} on {results['machine']['platform']}")
    header = f"{'setting':<12} {'model':<22} {'accuracy':>8} {'macro-F1':>8} {'s/epoch':>9} {'vs recipe':>9}"
    print(header)
    print("-" * len(header))
    for setting, entry in results["settings"].items():
        recipe = entry.get("original_recipe")
        for name, r in entry.get("baselines", {}).items():
            print(f"{setting:<12} {name:<22} {r['accuracy']:>8.4f} {r['macro_f1']:>8.4f} {'':>9} {'':>9}")
        for preset in presets:
            r = entry[preset]
            ratio = f"{r['speedup_vs_original_recipe']:.1f}x" if "speedup_vs_original_recipe" in r else ""
            print(f"{setting:<12} {'lstm ' + preset + ' preset':<22} {r['accuracy']:>8.4f} {r['macro_f1']:>8.4f} "
                  f"{r['median_seconds_per_epoch']:>9.1f} {ratio:>9}")
        if recipe:
            print(f"{setting:<12} {'original recipe':<22} {'':>8} {'':>8} {recipe['extrapolated_seconds_per_epoch']:>9.1f} "
                  f"{'1.0x':>9}   (extrapolated from the median of {recipe['batches_timed']} timed batches)")
    print("s/epoch: median over epochs (ours, measured) and batches x median batch time (recipe, extrapolated)")


if __name__ == "__main__":
    raise SystemExit(main())
