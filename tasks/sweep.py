"""Step "sweep": many training runs (a grid of configs x seeds) -> one comparison table.

The grid is a mapping of dotted config keys to the values to try (`train.lstm_units: [64, 96]`),
plus the special key `preset` (a --preset value); its Cartesian product gives the configs, each
trained once per seed (train.seed). The step reads each run's manifest and evaluation and writes:
- runs.parquet: one row per run (config, seed, test accuracy and macro-F1, best validation accuracy,
  each expert's test accuracy, seconds per epoch, run and evaluation keys);
- table.parquet: one row per config: mean and standard deviation over its seeds (sample standard
  deviation, ddof=1: null for a single seed) of the test accuracy, macro-F1, validation accuracy and the
  experts' accuracies, and the mean time per epoch (each run's median epoch).
The key covers the grid, the seeds and every upstream run and evaluation key: the same sweep over the
same runs is Cached.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from storage.artifacts import ArtifactRef, ArtifactStore
from storage.errors import PipelineError, UsageError
from storage.files import Staging
from tasks.step import Step

RUNS = pa.schema([
    ("config", pa.string()),
    ("seed", pa.int64()),
    ("accuracy", pa.float64()),
    ("macro_f1", pa.float64()),
    ("val_accuracy", pa.float64()),  # best epoch's, on the validation slice of the training split
    ("lstm_accuracy", pa.float64()),  # the LSTM expert alone on the test split (null without one)
    ("bow_accuracy", pa.float64()),  # the bag-of-words expert alone
    ("expert_weights", pa.list_(pa.float64())),
    ("epochs_run", pa.int32()),
    ("seconds_per_epoch", pa.float64()),  # median over the run's epochs
    ("device", pa.string()),
    ("train_key", pa.string()),
    ("evaluate_key", pa.string()),
])
MEASURES = ("accuracy", "macro_f1", "val_accuracy", "lstm_accuracy", "bow_accuracy")
TABLE = pa.schema(
    [("config", pa.string()), ("runs", pa.int32())]
    + [(f"{m}_{stat}", pa.float64()) for m in MEASURES for stat in ("mean", "std")]
    + [("seconds_per_epoch", pa.float64()), ("epochs_run", pa.float64())]
)


# -- the grid ----------------------------------------------------------------------------------------
def flatten_grid(data: Mapping[str, Any], where: str = "grid", prefix: str = "") -> dict[str, list]:
    """{"train": {"lstm_units": [64, 96]}} or {"train.lstm_units": [64, 96]} -> {"train.lstm_units": [64, 96]}."""
    grid: dict[str, list] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            grid.update(flatten_grid(value, where, f"{name}."))
        elif isinstance(value, list) and value:
            grid[name] = list(value)
        else:
            raise UsageError(f"{where}: {name} must be a non-empty list of values to try, got {value!r}")
    return grid


def parse_grid_item(item: str) -> dict[str, list]:
    """`train.lstm_units=64,96` -> {"train.lstm_units": [64, 96]} (each value read as JSON when it parses)."""
    key, sep, raw = item.partition("=")
    values = [v.strip() for v in raw.split(",") if v.strip()]
    if not sep or not key.strip() or not values:
        raise UsageError(f"--grid {item!r}: expected KEY=VALUE,VALUE... (e.g. train.lstm_units=64,96) or a TOML/JSON file")
    return {key.strip(): [_json_or_text(v) for v in values]}


def _json_or_text(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def grid_points(grid: Mapping[str, Sequence]) -> list[dict[str, Any]]:
    """The Cartesian product of the grid, in the order its keys and values were given ([{}] for no grid)."""
    if "train.seed" in grid:
        raise UsageError("--grid train.seed: give seeds with --seeds; the table aggregates over them")
    for key, values in grid.items():
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise UsageError(f"--grid {key}: a value is repeated in {values}")
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]


def point_label(point: Mapping[str, Any]) -> str:
    """How a grid point is named in the table: `train.lstm_units=64 preset=seed` ("base" for no grid)."""
    return " ".join(f"{k}={json.dumps(v, separators=(',', ':')) if not isinstance(v, str) else v}"
                    for k, v in point.items()) or "base"


def point_overrides(point: Mapping[str, Any]) -> list[str]:
    """KEY=VALUE overrides (tasks.config.build_config) of a grid point, values as JSON so they parse exactly."""
    return [f"{k}={json.dumps(v)}" for k, v in point.items() if k != "preset"]


# -- the table ---------------------------------------------------------------------------------------
def run_row(config: str, train_manifest: Mapping, metrics: Mapping) -> dict[str, Any]:
    """One row of runs.parquet from a run's manifest and its evaluation's metrics.json."""
    training = train_manifest.get("training") or {}
    experts = dict(zip(metrics.get("experts") or [], metrics.get("expert_accuracy") or [], strict=False))
    epochs = training.get("seconds_per_epoch") or []
    return {
        "config": config, "seed": int(train_manifest["params"]["seed"]),
        "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "val_accuracy": training.get("best_val_accuracy"),
        "lstm_accuracy": experts.get("lstm"), "bow_accuracy": experts.get("bow"),
        "expert_weights": training.get("expert_weights"), "epochs_run": training.get("epochs_run"),
        "seconds_per_epoch": statistics.median(epochs) if epochs else None,
        "device": training.get("device_name") or train_manifest.get("device"),
        "train_key": train_manifest["key"], "evaluate_key": metrics.get("evaluate_key"),
    }


def _mean_std(values: list) -> tuple[float | None, float | None]:
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def summarize(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per config (in first-seen order): mean and sample standard deviation over its seeds."""
    table = []
    for config in dict.fromkeys(r["config"] for r in rows):
        runs = [r for r in rows if r["config"] == config]
        row: dict[str, Any] = {"config": config, "runs": len(runs)}
        for measure in MEASURES:
            row[f"{measure}_mean"], row[f"{measure}_std"] = _mean_std([r[measure] for r in runs])
        row["seconds_per_epoch"] = _mean_std([r["seconds_per_epoch"] for r in runs])[0]
        row["epochs_run"] = _mean_std([r["epochs_run"] for r in runs])[0]
        table.append(row)
    return table


# -- step ----------------------------------------------------------------------------------------------
STEP = Step("sweep", version=1)


def write_sweep(store: ArtifactStore, labels: Sequence[str], runs: Sequence[ArtifactRef], out: Staging) -> dict:
    """runs: train and evaluate refs alternating, labels: the config of each pair."""
    rows = []
    for label, train, evaluation in zip(labels, runs[0::2], runs[1::2], strict=True):
        manifest, metrics = store.read_manifest(train), store.read_json(evaluation, "metrics.json")
        if manifest is None:
            raise PipelineError(f"{train.uri}: run manifest missing")
        rows.append(run_row(label, manifest, {**metrics, "evaluate_key": evaluation.key}))
    out.write_parquet("runs.parquet", pa.Table.from_pylist(rows, schema=RUNS), RUNS)
    table = summarize(rows)
    out.write_parquet("table.parquet", pa.Table.from_pylist(table, schema=TABLE), TABLE)
    return {"rows": len(table), "runs": len(rows), "table": table}


@STEP.task
def sweep(params: dict, labels: list[str], runs: list[ArtifactRef], data_home: str | None = None) -> ArtifactRef:
    """params (grid, seeds, configs) and the runs' refs make the key; labels name the config of each run."""
    if len(runs) != 2 * len(labels):
        raise PipelineError(f"sweep: {len(labels)} runs but {len(runs)} train/evaluate artifacts")
    return STEP.run(data_home, params, runs, lambda store, out: write_sweep(store, labels, runs, out))
