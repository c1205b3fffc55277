"""The whole job as one Prefect flow, wiring only:

    download glove ─► glove ────────────────┐
    download corpus ─► corpus ─► tokens ─► embeddings ─► train ─► evaluate

Every step is a task that is Cached when the data home already holds its artifact (tasks.step):
a second run with the same config shows every step Cached; changing one training parameter
re-runs only train and evaluate; a deleted artifact is rebuilt.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from prefect import flow

from flows.results import publish_results
from flows.steps import StepRunner, say
from flows.tokenize import shard_count, task_runner, tokenize_shards
from flows.train import train_then_evaluate
from storage.artifacts import ArtifactRef
from storage.home import data_home
from tasks.config import PipelineConfig, with_source_env
from tasks.corpus import corpus
from tasks.download import download
from tasks.embeddings import embeddings
from tasks.glove import glove
from tasks.tokens import STEP as TOKENS
from tasks.tokens import tokens

FLOW_NAME = "newsgroups-pipeline"
Stage = Literal["data", "tokens", "embeddings", "train", "evaluate"]


@flow(name=FLOW_NAME, description="GloVe + 20 Newsgroups -> Parquet -> LSTM classifier, cached step by step.")
def pipeline(config: PipelineConfig = PipelineConfig(), until: Stage = "evaluate",
             train_deployment: str | None = None) -> dict[str, Any]:
    """Run the steps up to `until`; return a JSON-able summary (artifacts, metrics, per-step state and time).

    Args:
        config: Everything the run depends on; each step is Cached when its part (and its inputs) are unchanged.
        until: Stop after this stage: data, tokens, embeddings, train or evaluate.
        train_deployment: Train and evaluate through this deployment (e.g. train-lstm/gpu, on the GPU work pool)
            instead of in this flow run. Empty: in this flow run.
    """
    started = time.perf_counter()
    config = with_source_env(config)  # the environment where the flow runs (a worker's own) counts
    run = StepRunner(data_home(config.data_home), until)
    run.store.check()  # an unreachable or misconfigured data home fails here, before any download
    say(f"data home: {run.home}")
    for source in (config.sources.glove, config.sources.corpus_file):
        say(f"source {source.name}: {source.url} (sha256 {source.sha256 or 'not pinned: recorded when fetched'})")

    token_ids, matrix = prepare_inputs(run, config)
    evaluation = train_then_evaluate(run, train_deployment, config.train, config.evaluate, token_ids, matrix)

    publish_results(run.store, evaluation, config=config.model_dump(mode="json"), trained_by=run.trained_by())
    return run.summary(started)


def prepare_inputs(run: StepRunner, config: PipelineConfig) -> tuple[ArtifactRef | None, ArtifactRef | None]:
    """The data steps: (tokens, embedding matrix) for training, None past `until`."""
    # Both downloads at once; each archive is processed as soon as it is there, GloVe beside the corpus.
    glove_zip = run.submit(download, config.sources.glove, name="download-glove")
    corpus_archive = run.submit(download, config.sources.corpus_file, name="download-corpus")
    documents = run.submit(corpus, config.corpus, corpus_archive)
    vectors = run.submit(glove, config.glove, glove_zip)
    # Tokens in shards, side by side on the task runner that config.parallel names; then joined in order.
    shards = run.shards(tokenize_shards.with_options(task_runner=task_runner(config.parallel)), TOKENS, config.tokenize,
                        documents, shard_count(config.parallel))
    token_ids = run(tokens, config.tokenize, documents, shards)
    return token_ids, run(embeddings, config.embeddings, token_ids, vectors)
