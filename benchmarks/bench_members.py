"""Does averaging models trained with different seeds help? The evidence for train.refit_members.

    .venv/bin/python benchmarks/bench_members.py benchmarks/results/cand_*.json ... [--out benchmarks/results/bench_members.json]

Reads bench_sweep.py result files whose runs trained with refit off (their models never saw the validation slice)
and scores each config's runs again on the latest validation slice: every run alone, every pair of runs averaged
(the normalised geometric mean of their experts, as tasks.model.model.member_mean does, with each run's own expert
weights) and all of them averaged; for the product of experts and for the LSTM expert alone. The test split is not
read. Per config: mean and sample standard deviation over the runs (single) and over the pairs.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from bench_slices import REPO, mean_std, slice_predictions


def log_probs(probs: np.ndarray) -> np.ndarray:
    return np.log(np.clip(probs, 1e-7, 1.0))


def averaged_accuracy(labels: np.ndarray, logs: list[np.ndarray]) -> float:
    """Accuracy of the normalised geometric mean of the members' probabilities (their log-probabilities summed)."""
    return float((sum(logs).argmax(-1) == labels).mean())


def members(sweep_file: Path) -> dict[str, dict]:
    from tasks.model.expert_product import product_probabilities

    runs = defaultdict(dict)  # config -> seed -> (labels, log p of the product, log p of the LSTM)
    for config, seed, _, labels, experts, weights, _ in slice_predictions(sweep_file):
        runs[config][seed] = (labels, log_probs(product_probabilities(experts, weights)), log_probs(experts[:, 0]))
    out = {}
    for config, by_seed in runs.items():
        labels = next(iter(by_seed.values()))[0]
        row = {"runs": len(by_seed), "documents": len(labels)}
        for part, name in ((1, "product"), (2, "lstm")):
            logs = {seed: run[part] for seed, run in by_seed.items()}
            single = [averaged_accuracy(labels, [logs[s]]) for s in logs]
            pairs = [averaged_accuracy(labels, [logs[a], logs[b]]) for a, b in itertools.combinations(logs, 2)]
            row |= dict(zip((f"{name}_single_mean", f"{name}_single_std"), mean_std(single), strict=True))
            row |= dict(zip((f"{name}_pair_mean", f"{name}_pair_std"), mean_std(pairs), strict=True))
            row[f"{name}_all"] = averaged_accuracy(labels, list(logs.values()))
        out[f"{sweep_file.name}: {config}"] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweeps", type=Path, nargs="+", help="bench_sweep.py result files (refit off)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_members.json")
    args = parser.parse_args()
    configs = {name: row for f in args.sweeps for name, row in members(f).items() if row["runs"] > 1}
    gains = {name: np.array([row[f"{name}_pair_mean"] - row[f"{name}_single_mean"] for row in configs.values()])
             for name in ("product", "lstm")}
    result = {"command": "benchmarks/bench_members.py " + " ".join(f"benchmarks/results/{f.name}" for f in args.sweeps),
              "configs": configs,
              "pair_minus_single": {name: {"mean": float(g.mean()), "min": float(g.min()), "max": float(g.max()),
                                           "configs_ahead": int((g > 0).sum()), "configs": len(g)}
                                    for name, g in gains.items()}}
    for name, row in configs.items():
        print(f"{name[:100]:100s} product {row['product_single_mean']:.4f} -> pair {row['product_pair_mean']:.4f}  "
              f"lstm {row['lstm_single_mean']:.4f} -> pair {row['lstm_pair_mean']:.4f}")
    print(json.dumps(result["pair_minus_single"], indent=1))
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
