"""The tokens step in shards (flows/tokenize.py): the same bytes as one pass, on threads, processes and a Dask cluster."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from storage.artifacts import ArtifactStore
from storage.errors import UsageError
from storage.schemas import DOCUMENTS
from tasks.config import ParallelConfig, TokenizeConfig
from tasks.tokens import tokens
from tests.tasks.test_tokens import TRICKY

pytestmark = pytest.mark.usefixtures("prefect_api")

CFG = TokenizeConfig(num_words=40, max_length=6, truncation="both")
FILES = ("vocab.parquet", "sequences.parquet", "tokenizer.json")


def publish_documents(home: str, rows_per_group: int = 7):
    """A corpus artifact whose documents.parquet has many small row groups; ties and repeats across them."""
    texts = [f"{TRICKY[i % len(TRICKY)]} w{i % 11} w{(i * 7) % 13} z{i}" for i in range(60)]
    table = pa.table({"doc_id": [f"d{i:03d}" for i in range(60)], "group": ["g"] * 60,
                      "label": pa.array([i % 3 for i in range(60)], pa.int16()),
                      "split": ["test" if i % 5 == 0 else "train" for i in range(60)], "text": texts}, schema=DOCUMENTS)

    def build(staging):
        with staging.parquet_writer("documents.parquet", DOCUMENTS) as writer:
            writer.write_table(table, row_group_size=rows_per_group)
        return {"rows": table.num_rows}

    return ArtifactStore(home).publish("corpus", "c1", build, version=1, params={})


def artifact_bytes(home: str, ref) -> dict[str, bytes]:
    return {name: (Path(ArtifactStore(home).local_dir(ref)) / name).read_bytes() for name in FILES}


def run_sharded(home: str, shards: int, runner: ParallelConfig):
    from flows.tokenize import task_runner, tokenize_shards

    corpus = publish_documents(home)
    parts = tokenize_shards.with_options(task_runner=task_runner(runner))(CFG, corpus, shards, data_home=home)
    assert [p.step for p in parts] == ["tokens-vocab"] + ["tokens-encode"] * shards
    return tokens.fn(CFG, corpus, parts, data_home=home)


@pytest.fixture(scope="module")
def one_pass(tmp_path_factory):
    home = str(tmp_path_factory.mktemp("one-pass"))
    ref = tokens.fn(CFG, publish_documents(home), data_home=home)
    return artifact_bytes(home, ref), ref


@pytest.mark.parametrize("shards", [1, 3, 12])  # 12 shards for 9 row groups: some read nothing
def test_shards_on_threads_give_the_bytes_of_one_pass_and_leave_no_scratch(tmp_path, one_pass, shards):
    home = str(tmp_path)
    ref = run_sharded(home, shards, ParallelConfig())
    expected, single = one_pass
    assert ref.key == single.key and artifact_bytes(home, ref) == expected
    assert ArtifactStore(home).read_manifest(ref)["shards"] == shards
    assert sorted(m["step"] for m in ArtifactStore(home).list()) == ["corpus", "tokens"]  # shard artifacts removed


def test_every_shard_returns_the_tokens_artifact_once_it_exists(tmp_path):
    from flows.tokenize import tokenize_shards

    home = str(tmp_path)
    ref = run_sharded(home, 2, ParallelConfig())
    again = tokenize_shards(CFG, publish_documents(home), 2, data_home=home)
    assert again == [ref, ref, ref]
    assert sorted(m["step"] for m in ArtifactStore(home).list()) == ["corpus", "tokens"]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("runner", [
    ParallelConfig(task_runner="processes"),
    ParallelConfig(task_runner="prefect_dask.DaskTaskRunner",
                   options={"cluster_kwargs": {"n_workers": 2, "threads_per_worker": 1, "processes": True,
                                               "dashboard_address": None}}),
], ids=["processes", "dask-local-cluster"])
def test_shards_on_processes_and_a_dask_cluster_give_the_same_bytes(tmp_path, one_pass, runner):
    pytest.importorskip("prefect_dask")
    home = str(tmp_path)
    ref = run_sharded(home, 2, runner)
    assert artifact_bytes(home, ref) == one_pass[0]


def test_an_unknown_task_runner_is_a_usage_error():
    from flows.tokenize import task_runner

    with pytest.raises(UsageError, match="cannot import no_such_module"):
        task_runner(ParallelConfig(task_runner="no_such_module.Runner"))
    with pytest.raises(UsageError, match="Prefect TaskRunner class"):
        task_runner(ParallelConfig(task_runner="pathlib.Path"))
