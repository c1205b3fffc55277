"""The whole job as one Prefect flow, wiring only:

    download glove ─► parse_glove ───────────────┐
    download corpus ─► build_corpus ─► tokenize ─► build_embeddings ─► train ─► evaluate

Every step is a cached task (tasks.common): a second run with the same config shows every
step Cached; changing one training parameter re-runs only train and evaluate. Before each
call the flow checks that the artifact a cache hit would return is still in the store
(flows.steps.validated), so a deleted artifact is rebuilt, never returned as a dangling ref.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from prefect import flow
from prefect.runtime import flow_run as current_flow_run

from storage.artifacts import ArtifactRef, ArtifactStore
from storage.errors import PipelineError
from storage.home import data_home as resolve_data_home
from tasks.config import EvaluateConfig, PipelineConfig, TrainConfig, source_from_env

from flows.steps import StepReport, say
from flows.train import read_metrics, train_and_evaluate

FLOW_NAME = "newsgroups-pipeline"
STEP_NAMES = ("download-glove", "download-corpus", "corpus", "glove", "tokens", "embeddings", "train", "evaluate")
STAGES = ("data", "tokens", "embeddings", "train", "evaluate")  # --until: stop after this stage
Stage = Literal["data", "tokens", "embeddings", "train", "evaluate"]


def with_source_env(config: PipelineConfig) -> PipelineConfig:
    """Apply NEWSGROUPS_LSTM_GLOVE_/CORPUS_ URL/SHA256 environment overrides (air-gapped mirrors)."""
    sources = config.sources
    glove = source_from_env("glove", sources.glove)
    corpus = source_from_env("corpus", sources.corpus_file)
    if glove == sources.glove and corpus == sources.corpus_file:
        return config
    corpus_source = corpus if corpus != sources.corpus_file else sources.corpus_source
    new_sources = sources.model_copy(update={"glove": glove, "corpus_source": corpus_source})
    return config.model_copy(update={"sources": new_sources})


@flow(name=FLOW_NAME, description="GloVe + 20 Newsgroups -> Parquet -> LSTM classifier, cached step by step.")
def pipeline(config: PipelineConfig = PipelineConfig(), until: Stage = "evaluate") -> dict[str, Any]:
    """Run the steps up to `until`; return a JSON-able summary (artifacts, metrics, per-step state and time)."""
    from tasks import corpus, download, embeddings, glove, tokenize

    started = time.perf_counter()
    config = with_source_env(config)
    home = resolve_data_home(config.data_home)
    store = ArtifactStore(home)
    report = StepReport()
    say(f"data home: {home}")

    # Both downloads at once; each archive is processed as soon as it is there.
    glove_src, corpus_src = config.sources.glove, config.sources.corpus_file
    glove_dl = report.submit("download-glove", download.download, store, download.STEP,
                             download.download_key(glove_src, home), glove_src, data_home=home)
    corpus_dl = report.submit("download-corpus", download.download, store, download.STEP,
                              download.download_key(corpus_src, home), corpus_src, data_home=home)
    corpus_archive = corpus_dl.result()
    documents_future = report.submit("corpus", corpus.build_corpus, store, corpus.STEP,
                                     corpus.corpus_key(config.corpus, corpus_archive),
                                     config.corpus, corpus_archive, data_home=home)
    glove_archive = glove_dl.result()
    vectors_future = report.submit("glove", glove.parse_glove, store, glove.STEP,
                                   glove.vectors_key(config.glove, glove_archive),
                                   config.glove, glove_archive, data_home=home)
    refs: dict[str, ArtifactRef] = {"download-corpus": corpus_archive, "download-glove": glove_archive}
    refs["corpus"] = documents = documents_future.result()

    def finish(metrics: dict[str, Any] | None = None) -> dict[str, Any]:
        return _summary(home, until, refs, report, started, metrics or {})

    if until == "data":
        refs["glove"] = vectors_future.result()
        return finish()

    # Tokenizing needs only the corpus: it overlaps with GloVe parsing.
    tokens = report.run("tokens", tokenize.tokenize, store, tokenize.STEP,
                        tokenize.tokens_key(config.tokenize, documents),
                        config.tokenize, documents, data_home=home)
    refs["tokens"] = tokens
    vectors = vectors_future.result()
    refs["glove"] = vectors
    if until == "tokens":
        return finish()

    matrix = report.run("embeddings", embeddings.build_embeddings, store, embeddings.STEP,
                        embeddings.embeddings_key(config.embeddings, tokens, vectors),
                        config.embeddings, tokens, vectors, data_home=home)
    refs["embeddings"] = matrix
    if until == "embeddings":
        return finish()

    # Where training runs must not change its cache keys (artifact and Prefect input hash): both share one run.
    train_cfg = config.train.model_copy(update={"deployment": None})
    train_until = "train" if until == "train" else "evaluate"
    if config.train.deployment:
        outcome = _train_on_deployment(config.train.deployment, train_cfg, config.evaluate, tokens, matrix,
                                       home, train_until, store, report)
    else:
        outcome = train_and_evaluate(train_cfg, config.evaluate, tokens, matrix, home, train_until)
        for name, entry in outcome["steps"].items():
            report.steps[name] = entry
    refs["train"] = ArtifactRef.model_validate(outcome["run"])
    if not outcome.get("evaluation"):
        return finish()
    refs["evaluate"] = ArtifactRef.model_validate(outcome["evaluation"])
    return finish(outcome.get("metrics") or read_metrics(store, refs["evaluate"]))


def _train_on_deployment(
    name: str,
    train_cfg: TrainConfig,
    evaluate_cfg: EvaluateConfig,
    tokens: ArtifactRef,
    matrix: ArtifactRef,
    home: str,
    until: str,
    store: ArtifactStore,
    report: StepReport,
) -> dict[str, Any]:
    """Run train + evaluate on a work pool (e.g. a GPU worker) and read the results from the store.

    run_deployment does not raise when the child fails, so its final state is checked here;
    the idempotency key stops a retried parent from starting a second training run.
    """
    from prefect.deployments import run_deployment

    from tasks import evaluate as evaluate_step
    from tasks import train as train_step

    run_key = train_step.run_key(train_cfg, tokens, matrix)
    parent = current_flow_run.id or "no-parent"
    say(f"train: submitting to deployment {name} (run key {run_key})")
    started = time.perf_counter()
    child = run_deployment(
        name,
        parameters={
            "train": train_cfg.model_dump(mode="json"),
            "evaluate": evaluate_cfg.model_dump(mode="json"),
            "tokens": tokens.model_dump(mode="json"),
            "embeddings": matrix.model_dump(mode="json"),
            "data_home": home,
            "until": until,
        },
        idempotency_key=f"{parent}-train-{run_key}",
    )
    seconds = time.perf_counter() - started
    state = child.state
    if state is None or not state.is_completed():
        state_name = state.name if state else "unknown"
        message = (state.message if state else None) or "no message"
        raise PipelineError(f"training deployment {name} (flow run {child.name}, pool {child.work_pool_name}) "
                            f"ended {state_name}: {message}")
    run = store.find(train_step.STEP, run_key)
    if run is None:
        raise PipelineError(f"training deployment {name} completed but {store.uri(train_step.STEP, run_key)} is "
                            "missing: the worker must use the same data home (shared filesystem or object storage)")
    where = {"flow_run": child.name, "work_pool": child.work_pool_name, "deployment": name}
    report.add("train", state.name, seconds, run, **where)
    outcome: dict[str, Any] = {"run": run.model_dump(mode="json"), "evaluation": None}
    if until == "evaluate":
        key = evaluate_step.evaluation_key(evaluate_cfg, run, tokens)
        evaluation = store.find(evaluate_step.STEP, key)
        if evaluation is None:
            raise PipelineError(f"training deployment {name} completed but {store.uri(evaluate_step.STEP, key)} "
                                "is missing: the worker must use the same data home")
        report.add("evaluate", state.name, 0.0, evaluation, **where)
        outcome["evaluation"] = evaluation.model_dump(mode="json")
    return outcome


def _summary(home: str, until: str, refs: dict[str, ArtifactRef], report: StepReport, started: float,
             metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        "data_home": home,
        "until": until,
        "artifacts": {step: ref.model_dump(mode="json") for step, ref in refs.items()},
        "metrics": metrics,
        "steps": {name: report.steps[name] for name in sorted(report.steps, key=_step_order)},
        "seconds": round(time.perf_counter() - started, 3),
    }


def _step_order(name: str) -> int:
    return STEP_NAMES.index(name) if name in STEP_NAMES else len(STEP_NAMES)
