"""`newsgroups-lstm sweep`: train a grid of configs x seeds (flows/sweep.py) and print their comparison table.

Kept beside flows/cli.py (which builds the parser and handles errors, signals and exit codes) so that each
command module stays small; the sweep runs like `run`: on the Prefect API flows.api chooses, in a worker
thread that a signal stops (flows/shutdown.py).
"""

from __future__ import annotations

import argparse
import contextvars
import json

from flows import render
from flows.api import prefect_api, start_local_api_early


def cmd_sweep(args: argparse.Namespace) -> int:
    from storage.files import read_config_file
    from tasks.config import build_config
    from tasks.sweep import flatten_grid, grid_points, parse_grid_item, point_label, point_overrides

    layers = [read_config_file(path) for path in args.config]
    grid: dict = {}
    for item in args.grid:  # KEY=V1,V2 or a TOML/JSON file of them
        grid.update(parse_grid_item(item) if "=" in item else flatten_grid(read_config_file(item), where=item))
    configs = {point_label(point): build_config(layers, [*args.overrides, *point_overrides(point)],
                                                point.get("preset", args.preset), args.data_home)
               for point in grid_points(grid)}
    first = next(iter(configs.values())).train.seed
    seeds = [first + i for i in range(args.seeds)]
    with prefect_api(started_early=start_local_api_early()) as api:
        from flows.sweep import sweep

        if api.kind == "temporary":  # Prefect will start a temporary API server, our child: ours to stop
            args.shutdown.start_lifeline()
        context = contextvars.copy_context()  # the sweep's thread sees the API chosen here
        summary = args.shutdown.run(lambda: context.run(sweep, configs, seeds, grid, args.train_deployment, args.parallel))
    print(json.dumps(summary, indent=2, default=str) if args.json else render.sweep(summary))
    return 0


def add_sweep_parser(sub, common: argparse.ArgumentParser, add_run_options) -> None:
    sweep = sub.add_parser("sweep", parents=[common], help="train a grid of configs x seeds; one table of mean and std",
                           description="Train every config of --grid (their Cartesian product, on top of the base "
                                       "config built as for `run`) once per seed, then compare them: mean and standard "
                                       "deviation over seeds of test accuracy and macro-F1, validation accuracy, each "
                                       "expert alone, seconds per epoch. Runs already in the data home are Cached.")
    add_run_options(sweep)
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2|FILE",
                       help="values to try: train.lstm_units=64,96 (repeatable), `preset=default,seed`, or a TOML/JSON "
                            "file of lists ([train] lstm_units = [64, 96]; corpus.strip = [[], [\"headers\"]])")
    sweep.add_argument("--seeds", type=_positive, default=1, metavar="N",
                       help="runs per config, with train.seed, train.seed+1, ... (default 1)")
    sweep.add_argument("--train-deployment", metavar="FLOW/DEPLOYMENT", help="train each run through this deployment")
    sweep.add_argument("--parallel", type=_positive, metavar="N",
                       help="runs at once (default: 1 in this process, all with --train-deployment)")
    sweep.set_defaults(func=cmd_sweep)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value
