"""The sweep step's pure parts: the grid (command line and file forms), labels, and the per-config aggregation."""

from __future__ import annotations

import statistics

import pytest

from storage.errors import UsageError
from tasks.config import build_config
from tasks.sweep import flatten_grid, grid_points, parse_grid_item, point_label, point_overrides, run_row, summarize


def test_grid_from_the_command_line_and_from_a_file_is_the_same_product():
    line = {**parse_grid_item("train.lstm_units=64,96"), **parse_grid_item("train.validation=latest,random")}
    nested = flatten_grid({"train": {"lstm_units": [64, 96], "validation": ["latest", "random"]}})
    assert line == nested == flatten_grid({"train.lstm_units": [64, 96], "train.validation": ["latest", "random"]})
    points = grid_points(line)
    assert points == [{"train.lstm_units": u, "train.validation": v} for u in (64, 96) for v in ("latest", "random")]
    assert point_label(points[1]) == "train.lstm_units=64 train.validation=random"
    assert grid_points({}) == [{}] and point_label({}) == "base"


def test_grid_points_become_configs_with_values_of_any_type():
    grid = flatten_grid({"corpus": {"strip": [[], ["headers", "quotes"]]}, "preset": ["seed"]})
    configs = [build_config([], point_overrides(p), p.get("preset")) for p in grid_points(grid)]
    assert [c.corpus.strip for c in configs] == [(), ("headers", "quotes")]
    assert {c.train.preset for c in configs} == {"seed"}
    assert point_label(grid_points(grid)[1]) == 'corpus.strip=["headers","quotes"] preset=seed'


@pytest.mark.parametrize("bad", ["train.lstm_units", "train.lstm_units=", "=1,2"])
def test_malformed_grid_items_are_usage_errors(bad):
    with pytest.raises(UsageError, match="KEY=VALUE"):
        parse_grid_item(bad)


def test_grid_files_must_hold_lists_values_are_distinct_and_seeds_come_from_seeds():
    with pytest.raises(UsageError, match="grid.toml: train.lstm_units must be a non-empty list"):
        flatten_grid({"train": {"lstm_units": 64}}, where="grid.toml")
    with pytest.raises(UsageError, match="--seeds"):
        grid_points({"train.seed": [1, 2]})
    with pytest.raises(UsageError, match="repeated"):
        grid_points(parse_grid_item("train.lstm_units=64,96,64"))


def _row(config, seed, accuracy, seconds):
    manifest = {"key": f"k{seed}", "params": {"seed": seed},
                "training": {"best_val_accuracy": accuracy + 0.05, "expert_weights": [0.5, 1.0], "epochs_run": 3,
                             "seconds_per_epoch": seconds, "device_name": "cpu"}}
    metrics = {"accuracy": accuracy, "macro_f1": accuracy - 0.01, "experts": ["lstm", "bow"],
               "expert_accuracy": [accuracy - 0.1, accuracy - 0.02]}
    return run_row(config, manifest, metrics)


def test_summary_is_mean_and_sample_standard_deviation_per_config():
    rows = [_row("a", 1, 0.80, [2.0, 4.0, 3.0]), _row("a", 2, 0.90, [5.0]), _row("b", 1, 0.70, [])]
    assert rows[0]["seconds_per_epoch"] == 3.0 and rows[0]["lstm_accuracy"] == pytest.approx(0.70)
    a, b = summarize(rows)
    assert (a["config"], a["runs"], b["runs"]) == ("a", 2, 1)
    assert a["accuracy_mean"] == pytest.approx(0.85) and a["accuracy_std"] == pytest.approx(statistics.stdev([0.8, 0.9]))
    assert a["bow_accuracy_mean"] == pytest.approx(0.83) and a["val_accuracy_mean"] == pytest.approx(0.90)
    assert a["seconds_per_epoch"] == pytest.approx(4.0)
    assert b["accuracy_std"] is None and b["seconds_per_epoch"] is None  # one seed: no spread; no epochs timed
