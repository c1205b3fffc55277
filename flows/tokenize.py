"""The shards of the tokens step as a subflow: count_shard.map -> fit_vocab -> encode_shard.map.

It runs on its own task runner, chosen by PipelineConfig.parallel (the rest of the pipeline keeps
Prefect's default thread pool): "threads", "processes", or any Prefect task runner class by its
import path, e.g. `parallel.task_runner=prefect_dask.DaskTaskRunner` with
`parallel.options={"address": "tcp://scheduler:8786"}` to spread the shards over a Dask cluster.
The pipeline then calls tasks.tokens.tokens with the shards, which joins them in document order.
"""

from __future__ import annotations

import importlib
import os

from prefect import flow, unmapped
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from storage.artifacts import ArtifactRef
from storage.errors import UsageError
from tasks.config import ParallelConfig, TokenizeConfig
from tasks.tokens import count_shard, encode_shard, fit_vocab


def shard_count(parallel: ParallelConfig) -> int:
    return parallel.shards or os.cpu_count() or 1


def task_runner(parallel: ParallelConfig) -> TaskRunner:
    """The task runner parallel.task_runner names, built with parallel.options."""
    if parallel.task_runner == "threads":
        return ThreadPoolTaskRunner(**{"max_workers": shard_count(parallel), **parallel.options})
    if parallel.task_runner == "processes":
        return ProcessPoolTaskRunner(**{"max_workers": shard_count(parallel), **parallel.options})
    module, _, name = parallel.task_runner.replace(":", ".").rpartition(".")
    try:
        runner = getattr(importlib.import_module(module), name) if module else None
    except ImportError as exc:
        raise UsageError(f"parallel.task_runner={parallel.task_runner!r}: cannot import {module} ({exc})") from None
    if not (isinstance(runner, type) and issubclass(runner, TaskRunner)):
        raise UsageError(f"parallel.task_runner={parallel.task_runner!r}: expected 'threads', 'processes' or the import "
                         "path of a Prefect TaskRunner class, e.g. prefect_dask.DaskTaskRunner")
    return runner(**parallel.options)


@flow(name="tokenize-shards", description="Word counts, vocabulary and ids of documents.parquet, shard by shard.")
def tokenize_shards(cfg: TokenizeConfig, corpus: ArtifactRef, shards: int, data_home: str | None = None) -> list[ArtifactRef]:
    """[vocabulary, encoded shard 0, 1, ...]: what tasks.tokens.tokens joins (every one of them is the tokens
    artifact itself when that was published meanwhile)."""
    counts = count_shard.map(unmapped(cfg), unmapped(corpus), range(shards), shards, data_home=data_home)
    vocab = fit_vocab.submit(cfg, corpus, counts, data_home=data_home)
    parts = encode_shard.map(unmapped(cfg), unmapped(corpus), unmapped(vocab), range(shards), shards, data_home=data_home)
    return [vocab.result(), *parts.result()]
