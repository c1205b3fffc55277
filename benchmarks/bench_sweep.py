"""The sweep on the real data: presets x text settings x seeds through the project's own sweep flow, TF-IDF baselines beside.

    .venv/bin/python benchmarks/bench_sweep.py [--data ../shared/data] [--seeds 3] [--presets default,seed]
        [--settings distributed,stripped] [--set KEY=VALUE ...] [--data-home benchmarks/.home]
        [--out benchmarks/results/bench_sweep.json]

Runs flows.sweep.sweep (what `newsgroups-lstm sweep` runs) over the grid preset x corpus.strip, --seeds runs per
config, on file:// copies of the archives in --data (pinned by the sha256 of shared/data/README.md), in a data home of
its own that is kept: runs already there are Cached, so a rerun only adds what changed. Then TF-IDF + LinearSVC and
+ logistic regression (benchmarks/bench_train.py) on each setting's tokens artifact: the token ids the default preset
reads. Prints the README results table (mean ± sample standard deviation over seeds). Model settings are chosen on
the validation slice (val. accuracy), never on these test figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_train import SETTINGS, SHA256, log, sha256, tfidf_baselines  # noqa: E402


def sweep_configs(data: Path, home: Path, presets: list[str], settings: list[str], overrides: list[str],
                  extra_grid: list[str] = ()) -> tuple[dict, dict]:
    """(label -> PipelineConfig, grid) for presets x settings (x any --grid KEY=V1,V2) on the local archives."""
    from tasks.config import build_config
    from tasks.sweep import grid_points, parse_grid_item, point_label, point_overrides

    # size and mirrors cleared: they describe the published archive, not this repack
    sources = {"glove": {"url": (data / "glove.6B.zip").as_uri(), "sha256": SHA256["glove.6B.zip"], "size": None, "mirrors": []},
               "corpus_source": {"url": (data / "20news-bydate.tar.gz").as_uri(), "sha256": SHA256["20news-bydate.tar.gz"],
                                 "filename": "20news-bydate.tar.gz"}}
    grid = {"preset": presets, "corpus.strip": [list(SETTINGS[s]) for s in settings]}
    for item in extra_grid:
        grid.update(parse_grid_item(item))
    configs = {point_label(p): build_config([{"sources": sources}], [*overrides, *point_overrides(p)], p["preset"], str(home))
               for p in grid_points(grid)}
    return configs, grid


def setting_of(strip: tuple) -> str:
    return next(name for name, value in SETTINGS.items() if tuple(value) == tuple(strip))


def baselines_of(store, train_key: str) -> dict:
    """The TF-IDF baselines on the tokens a run was trained on."""
    from storage.schemas import SEQUENCES
    from tasks.train import split_sequences

    manifest = store.read_manifest("train", train_key)
    tokens = next(store.find(u["step"], u["key"]) for u in manifest["upstream"] if u["step"] == "tokens")
    table = store.read_parquet(tokens, "sequences.parquet", SEQUENCES, columns=["label", "split", "ids"])
    rules = store.read_json(tokens, "tokenizer.json")
    labels = table["label"].to_numpy().astype(np.int64)
    is_test = np.asarray(table["split"].to_pylist()) == "test"
    return tfidf_baselines(split_sequences(table), labels, is_test, rules["vocab_size"] + 1, int(labels.max()) + 1)


def readme_rows(result: dict) -> list[str]:
    """Markdown rows: text, model, accuracy, macro-F1, LSTM expert alone, validation accuracy, s/epoch."""
    def spread(row, measure):
        mean, std = row.get(f"{measure}_mean"), row.get(f"{measure}_std")
        return "-" if mean is None else f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")

    lines = []
    for setting in result["settings"]:
        text = "as distributed" if setting == "distributed" else "stripped"
        for row in result["sweep"]["table"]:
            if result["config_setting"][row["config"]] == setting:
                model = f"{result['config_preset'][row['config']]} preset" + result["config_extra"].get(row["config"], "")
                lines.append(f"| {text} | {model} | {spread(row, 'accuracy')} | {spread(row, 'macro_f1')} | "
                             f"{spread(row, 'lstm_accuracy')} | {spread(row, 'val_accuracy')} | {row['seconds_per_epoch']:.1f} |")
        for name, label in (("tfidf_linearsvc", "TF-IDF + LinearSVC"), ("tfidf_logreg", "TF-IDF + logistic regression")):
            b = result["baselines"].get(setting, {}).get(name)
            if b:
                lines.append(f"| {text} | {label} | {b['accuracy']:.4f} | {b['macro_f1']:.4f} | - | - | - |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--presets", default="default,seed")
    parser.add_argument("--settings", default="distributed,stripped")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override for every run")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="more values to try (settings are chosen on the validation accuracy, never on the test split)")
    parser.add_argument("--data-home", type=Path, default=REPO / "benchmarks" / ".home")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_sweep.json")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    for name, expected in SHA256.items():
        if sha256(args.data / name) != expected:
            raise SystemExit(f"{args.data / name}: not the archive of shared/data/README.md")
    presets, settings, args.data = args.presets.split(","), args.settings.split(","), args.data.resolve()
    configs, grid = sweep_configs(args.data, args.data_home, presets, settings, args.set, args.grid)

    from flows.sweep import sweep
    from storage.artifacts import ArtifactStore

    started = time.perf_counter()
    first_seed = next(iter(configs.values())).train.seed
    summary = sweep(configs, [first_seed + i for i in range(args.seeds)], grid)
    log(f"sweep: {len(summary['runs'])} runs in {time.perf_counter() - started:.0f} s")
    store = ArtifactStore(str(args.data_home))
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "command": " ".join(sys.argv),
        "settings": settings, "sweep": summary, "baselines": {},
        "config_setting": {label: setting_of(c.corpus.strip) for label, c in configs.items()},
        "config_preset": {label: c.train.preset for label, c in configs.items()},
        "config_extra": {label: "".join(f", {part}" for part in label.split(" ")
                                        if not part.startswith(("preset=", "corpus.strip="))) for label in configs},
    }
    for setting in settings:
        run = next(r for r in summary["runs"] if result["config_setting"][r["config"]] == setting)
        log(f"== {setting}: TF-IDF baselines")
        result["baselines"][setting] = baselines_of(store, run["steps"]["train"]["key"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print("| text | model | accuracy | macro-F1 | LSTM expert alone | validation accuracy | s/epoch (2 CPU cores, TF) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(readme_rows(result)))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
