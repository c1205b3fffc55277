"""A sweep: a grid of configs x seeds as training runs, compared in one table.

    data steps (once per distinct data config) ─► train + evaluate per (config, seed) ─► sweep table

Each run is one task (`train-evaluate`) submitted on the flow's task runner, at most `parallel` at
a time, training in this process or through a training deployment (e.g. the GPU pool, where
`parallel` can match the workers). Its train and evaluate steps are cached by key like the pipeline's:
the same config and seed are Cached, so a sweep reruns only what is new, and a config shared with
`newsgroups-lstm run` reuses that run. The table is a `sweep` step artifact (tasks/sweep.py), a
Prefect table artifact and the summary the CLI prints.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.pipeline import prepare_inputs
from flows.results import publish_sweep
from flows.steps import StepRunner, say
from flows.train import train_then_evaluate
from storage.errors import PipelineError
from storage.home import data_home
from tasks import sweep as sweep_step
from tasks.config import EvaluateConfig, PipelineConfig, TrainConfig, with_source_env

FLOW_NAME = "newsgroups-sweep"


@task(name="train-evaluate", cache_policy=NO_CACHE, persist_result=False, task_run_name="train-evaluate {label} seed {seed}")
def train_evaluate_run(label: str, seed: int, home: str, deployment: str | None, train: TrainConfig,
                       evaluate: EvaluateConfig, tokens, embeddings) -> dict[str, Any]:
    """One run of the sweep: its train and evaluate artifacts and how each step ended (Completed / Cached)."""
    run = StepRunner(home)
    train_then_evaluate(run, deployment, train, evaluate, tokens, embeddings)
    return {"config": label, "seed": seed, "train": run.refs["train"], "evaluate": run.refs["evaluate"], "steps": run.steps}


@flow(name=FLOW_NAME, description="Train a grid of configs x seeds and compare them: mean and standard deviation per config.")
def sweep(configs: dict[str, PipelineConfig], seeds: list[int], grid: dict[str, list] | None = None,
          train_deployment: str | None = None, parallel: int | None = None) -> dict[str, Any]:
    """configs: label -> config (each trained once per seed, train.seed = seed). grid: what made them (for the record
    and the key). parallel: runs at once (default: 1 in this process, all of them with a training deployment)."""
    started = time.perf_counter()
    configs = {label: with_source_env(config) for label, config in configs.items()}
    homes = {data_home(config.data_home) for config in configs.values()}
    if len(homes) != 1 or not seeds:
        raise PipelineError(f"a sweep needs configs that share one data home (got {sorted(homes)}) and seeds (got {seeds})")
    home = homes.pop()
    runs = [(label, seed) for label in configs for seed in seeds]
    say(f"sweep: {len(configs)} configs x {len(seeds)} seeds = {len(runs)} runs, data home {home}")

    data_runners: dict[str, StepRunner] = {}
    inputs = {}
    for label, config in configs.items():  # the data steps once per distinct data config
        data_config = config.model_dump_json(exclude={"train", "evaluate"})
        if data_config not in data_runners:
            data_runners[data_config] = StepRunner(home)
            inputs[data_config] = prepare_inputs(data_runners[data_config], config)
        inputs[label] = inputs[data_config]

    limit = max(1, parallel or (len(runs) if train_deployment else 1))
    futures, window = [], []
    for label, seed in runs:
        config = configs[label]
        if len(window) >= limit:
            window.pop(0).wait()
        future = train_evaluate_run.submit(label, seed, home, train_deployment, config.train.model_copy(update={"seed": seed}),
                                           config.evaluate, *inputs[label])
        futures.append(future)
        window.append(future)
    results = [future.result() for future in futures]

    table_runner = StepRunner(home)
    params = {"grid": grid or {}, "seeds": seeds, "configs": list(configs)}
    table = table_runner(sweep_step.sweep, params, [r["config"] for r in results],
                         [ref for r in results for ref in (r["train"], r["evaluate"])])
    publish_sweep(table_runner.store, table)
    return {
        "data_home": home, "grid": grid or {}, "seeds": seeds, "artifact": table.model_dump(mode="json"),
        "state": table_runner.steps["sweep"]["state"],
        "table": (table_runner.store.read_manifest(table) or {}).get("table", []),
        "runs": [{"config": r["config"], "seed": r["seed"],
                  "steps": {name: {k: step.get(k) for k in ("state", "seconds", "key")} for name, step in r["steps"].items()}}
                 for r in results],
        "data_steps": [{name: step["state"] for name, step in runner.steps.items()} for runner in data_runners.values()],
        "seconds": round(time.perf_counter() - started, 3),
    }
