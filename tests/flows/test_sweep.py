"""The sweep flow and `newsgroups-lstm sweep` on tiny data under a real (test) Prefect API: configs x seeds as
cached training runs, one table of mean and standard deviation, published to the store and to Prefect."""

from __future__ import annotations

import json
import statistics

import pytest

from flows.cli import EXIT_OK, main
from storage.artifacts import ArtifactStore
from tasks.sweep import RUNS, TABLE, grid_points, parse_grid_item, point_label, point_overrides
from tests.flows.conftest import tiny_config_dict

pytestmark = pytest.mark.usefixtures("prefect_api")


def test_two_configs_by_two_seeds_give_four_runs_one_table_and_a_rerun_is_all_cached(tiny_sources, home, tmp_path, capsys):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.sweep import sweep
    from tasks.config import build_config

    base = tiny_config_dict(tiny_sources, home)
    grid = parse_grid_item("train.lstm_units=4,8")
    configs = {point_label(p): build_config([base], point_overrides(p)) for p in grid_points(grid)}
    seeds = [1337, 1338]  # what `--seeds 2` gives on the tiny config's train.seed
    first = sweep(configs, seeds, grid, parallel=2)

    assert [(r["config"], r["seed"]) for r in first["runs"]] == [(c, s) for c in configs for s in seeds]
    assert {s["state"] for r in first["runs"] for s in r["steps"].values()} == {"Completed"}
    assert len({r["steps"]["train"]["key"] for r in first["runs"]}) == 4
    assert first["state"] == "Completed" and len(first["data_steps"]) == 1  # both configs share the data steps

    store = ArtifactStore(home)
    ref = store.find("sweep", first["artifact"]["key"], verify=True)
    runs = store.read_parquet(ref, "runs.parquet", RUNS).to_pylist()
    table = store.read_parquet(ref, "table.parquet", TABLE).to_pylist()
    assert len(runs) == 4 and [row["config"] for row in table] == list(configs) and table == first["table"]
    for row in table:
        mine = [r for r in runs if r["config"] == row["config"]]
        accuracy = [store.read_json(store.find("evaluate", r["evaluate_key"]), "metrics.json")["accuracy"] for r in mine]
        assert row["runs"] == 2 and row["accuracy_mean"] == pytest.approx(statistics.fmean(accuracy))
        assert row["accuracy_std"] == pytest.approx(statistics.stdev(accuracy))
        assert row["macro_f1_std"] is not None and row["seconds_per_epoch"] > 0
        assert 0 <= row["lstm_accuracy_mean"] <= 1 and 0 <= row["val_accuracy_mean"] <= 1
    with get_client(sync_client=True) as client:
        published = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["sweep-table"])))
    assert published and {row["config"] for row in json.loads(published[-1].data)} == set(configs)

    # The same sweep from the command line: every step Cached, the same table artifact, printed with its spread.
    config = tmp_path / "base.json"
    config.write_text(json.dumps(base))
    assert main(["sweep", "-c", str(config), "--grid", "train.lstm_units=4,8", "--seeds", "2"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "train.lstm_units=4" in out and "±" in out
    assert "8/8 train/evaluate steps Cached, 6/6 data steps Cached, table Cached" in out and ref.uri in out
