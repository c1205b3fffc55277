"""What checking every artifact against its manifest costs a cached rerun of the real data (local data home).

    .venv/bin/python benchmarks/bench_verify.py [--data ../shared/data] [--home DIR] [--repeats 3]

Runs the pipeline once if the home does not hold it yet (the first run trains: ~3 min on 2 cores),
then, in this process, through the flow:
- cached reruns (every step Cached): wall seconds, and seconds spent verifying (storage.integrity.STATS);
- one rerun after deleting every stamp sidecar (.verified.json): the first check of an unstamped home,
  which hashes every file once;
- `ArtifactStore.verify()` (what `newsgroups-lstm verify` does): every file re-hashed, stamps ignored.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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


def rerun(config) -> dict:
    from flows.pipeline import pipeline
    from storage.integrity import STATS

    before_s, before_files, before_bytes = STATS.seconds, STATS.files, STATS.hashed_bytes
    started = time.perf_counter()
    summary = pipeline(config)
    wall = time.perf_counter() - started
    states = {step["state"] for step in summary["steps"].values()}
    return {"wall_s": round(wall, 3), "flow_s": summary["seconds"], "states": sorted(states),
            "verify_s": round(STATS.seconds - before_s, 4), "files_checked": STATS.files - before_files,
            "hashed_bytes": STATS.hashed_bytes - before_bytes,
            "verify_share": round((STATS.seconds - before_s) / wall, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--home", help="data home (default: a new temporary directory)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    data = Path(args.data).resolve()
    os.environ.update({
        "NEWSGROUPS_LSTM_GLOVE_URL": (data / "glove.6B.zip").as_uri(),
        "NEWSGROUPS_LSTM_GLOVE_SHA256": SHA256["glove.6B.zip"],
        "NEWSGROUPS_LSTM_CORPUS_URL": (data / "20news-bydate.tar.gz").as_uri(),
        "NEWSGROUPS_LSTM_CORPUS_SHA256": SHA256["20news-bydate.tar.gz"],
    })
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from storage.artifacts import ArtifactStore
    from storage.integrity import STAMPS
    from tasks.config import PipelineConfig

    home = args.home or tempfile.mkdtemp(prefix="bench-verify-")
    config = PipelineConfig(data_home=home)
    first = rerun(config)  # builds what is missing (or is already a cached rerun)
    cached = [rerun(config) for _ in range(args.repeats)]

    store = ArtifactStore(home)
    for sidecar in Path(home).glob(f"*/*/{STAMPS}"):
        sidecar.unlink()
    unstamped = rerun(config)

    started = time.perf_counter()
    checked, damaged = store.verify()
    full = {"seconds": round(time.perf_counter() - started, 3), "artifacts": checked, "damaged": len(damaged),
            "bytes": sum(meta["bytes"] for m in store.list() for meta in m["files"].values())}

    result = {"host": platform.node(), "cpus": os.cpu_count(), "load_avg": os.getloadavg(), "home": home,
              "first": first, "cached": cached, "cached_after_deleting_stamps": unstamped, "verify_command": full}
    out = REPO / "benchmarks" / "results" / "bench_verify.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
