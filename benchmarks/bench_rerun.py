"""Wall time of an identical rerun of `newsgroups-lstm run` (every step Cached), per Prefect API, in one run:

    local       the background server a previous command started (the default)
    cold        the same, after that server stopped (idle): this command starts it again
    temporary   NEWSGROUPS_LSTM_SERVER_IDLE_MINUTES=0: Prefect's temporary API, started by every command
                (what every command did before the background server)
    baseline    with --baseline DIR: the CLI of another checkout (e.g. the main branch), as it is

    .venv/bin/python benchmarks/bench_rerun.py --tiny [--runs 3]
    .venv/bin/python benchmarks/bench_rerun.py --data ../shared/data [--data-home DIR] [--runs 3] [--baseline ../main]

--data trains the default preset on the local copies of 20news-bydate + GloVe first (minutes on a
CPU) unless --data-home already holds that run. Each mode's PREFECT_HOME is this script's own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHA256 = {  # from shared/data/README.md (repacked copies)
    "20news-bydate.tar.gz": "53027b79f71f27034d8d89a5b453d614685f400af36370c9df8766299899ec78",
    "glove.6B.zip": "a91fc13449f05cce32e3752c5e0b8b7a9e1a948063e6222e43b8320682ab0c1d",
}


def config_for(args, work: Path) -> Path:
    path = work / "cfg.json"
    if args.tiny:
        from tests.flows.conftest import _corpus_tar, _glove_zip, _sha256, tiny_config_dict

        corpus, glove = work / "tiny-news.tar.gz", work / "glove.6B.zip"
        _corpus_tar(corpus)
        _glove_zip(glove)
        sources = {"corpus": {"url": corpus.as_uri(), "sha256": _sha256(corpus), "filename": corpus.name},
                   "glove": {"url": glove.as_uri(), "sha256": _sha256(glove), "filename": glove.name}}
        config = tiny_config_dict(sources, str(args.data_home or work / "home"))
    else:
        data = args.data.resolve()
        config = {"data_home": str(args.data_home or work / "home"),
                  "sources": {"glove": {"url": (data / "glove.6B.zip").as_uri(), "sha256": SHA256["glove.6B.zip"]},
                              "corpus_source": {"url": (data / "20news-bydate.tar.gz").as_uri(),
                                                "sha256": SHA256["20news-bydate.tar.gz"]}}}
    path.write_text(json.dumps(config))
    return path


def cli(config: Path, prefect_home: Path, idle: str = "15", checkout: Path = REPO) -> tuple[float, dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(prefect_home), PYTHONPATH=str(checkout), NEWSGROUPS_LSTM_SERVER_IDLE_MINUTES=idle)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "-c", str(config), "--json"], env=env,
                          cwd=checkout, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"newsgroups-lstm run failed:\n{done.stderr[-3000:]}")
    return seconds, json.loads(done.stdout)


def stop_server(prefect_home: Path) -> None:
    from storage.prefect_api import stop

    stop(prefect_home)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tiny", action="store_true", help="the tests' tiny generated corpus")
    source.add_argument("--data", type=Path, help="directory with 20news-bydate.tar.gz and glove.6B.zip")
    parser.add_argument("--data-home", type=Path, help="reuse this data home (keeps a trained run between invocations)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="also time this checkout's CLI (e.g. ../main)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-rerun-") as tmp:
        work = Path(tmp)
        config, prefect_home = config_for(args, work), work / "prefect"
        first_s, summary = cli(config, prefect_home)  # trains unless cached; creates the database; starts the server
        if args.baseline:  # its artifact keys may differ (other step versions): its first run, untimed, caches them
            cli(config, prefect_home, checkout=args.baseline.resolve())
        load_before = os.getloadavg()
        runs: dict[str, list[float]] = {"local": [], "cold": [], "temporary": []} | ({"baseline": []} if args.baseline else {})
        try:  # the modes interleaved, so that a change in the machine's load hits all of them alike
            for _ in range(args.runs):
                stop_server(prefect_home)
                if args.baseline:
                    runs["baseline"].append(cli(config, prefect_home, checkout=args.baseline.resolve())[0])
                runs["temporary"].append(cli(config, prefect_home, idle="0")[0])
                runs["cold"].append(cli(config, prefect_home)[0])  # starts the server...
                seconds, summary = cli(config, prefect_home)  # ...which this one reuses
                assert {s["state"] for s in summary["steps"].values()} == {"Cached"}, summary["steps"]
                runs["local"].append(seconds)
        finally:
            stop_server(prefect_home)
        load_after = os.getloadavg()

    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "data": "tiny" if args.tiny else str(args.data), "first_run_s": round(first_s, 2),
        "baseline": str(args.baseline) if args.baseline else None,
        "load_average_1min": [round(load_before[0], 2), round(load_after[0], 2)],
        "rerun_wall_s": {mode: [round(s, 2) for s in values] for mode, values in runs.items()},
        "rerun_median_s": {mode: round(statistics.median(values), 2) for mode, values in runs.items()},
        "metrics": summary.get("metrics"),
    }
    for mode, values in runs.items():
        print(f"{mode:10s} median {statistics.median(values):5.2f} s   runs {', '.join(f'{s:.2f}' for s in values)}")
    print(f"load average (1 min) before/after: {results['load_average_1min']}")
    out = REPO / "benchmarks" / "results" / f"bench_rerun_{'tiny' if args.tiny else 'bydate'}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
