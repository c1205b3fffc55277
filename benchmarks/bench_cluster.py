"""The nightly run across the local cluster (deployments/cluster.py) against `newsgroups-lstm run` here,
on the tests' tiny generated data served over loopback HTTP.

Measures: the cluster's start-up (PostgreSQL, S3, the Prefect server on PostgreSQL, deploy, workers); the
wall time of `prefect deployment run newsgroups-pipeline/nightly --watch` (training on the gpu worker,
data home on S3), cold and cached; the local disk each worker keeps afterwards (du of its HOME, TMPDIR,
PREFECT_HOME and working directory); and `newsgroups-lstm run` of the same config in one process
(local data home, the cluster's Prefect API, so no temporary server start), cold and cached.

    PYTHONPATH=$PWD python benchmarks/bench_cluster.py     # writes benchmarks/results/bench_cluster.json
"""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from deployments.cluster import local_cluster  # noqa: E402
from tests.flows.conftest import _corpus_tar, _glove_zip, _sha256, tiny_config_dict  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results" / "bench_cluster.json"


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def _du_bytes(path: Path) -> int:
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])


def _local_run(config_path: Path, env: dict) -> tuple[float, dict]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "-c", str(config_path), "--json"], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=1200)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"newsgroups-lstm run failed:\n{done.stderr[-3000:]}")
    return round(seconds, 2), json.loads(done.stdout)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as scratch:
        scratch = Path(scratch)
        corpus, glove = scratch / "tiny-news.tar.gz", scratch / "glove.6B.zip"
        _corpus_tar(corpus)
        _glove_zip(glove)
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(scratch)))
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        sources = {name: {"url": f"{base}/{path.name}", "sha256": _sha256(path), "filename": path.name}
                   for name, path in (("corpus", corpus), ("glove", glove))}
        result: dict = {"host": platform.node(), "cpus": os.cpu_count(), "load_before": os.getloadavg()[0]}
        started = time.perf_counter()
        with local_cluster() as cluster:
            result["cluster_start_s"] = round(time.perf_counter() - started, 2)
            result["start_s"] = {part: round(s, 2) for part, s in cluster.seconds.items()}
            config = tiny_config_dict(sources, cluster.data_home)
            for label in ("nightly_cold_s", "nightly_cached_s"):
                started = time.perf_counter()
                done = cluster.run_nightly({"config": config})
                result[label] = round(time.perf_counter() - started, 2)
                if done.returncode != 0:
                    raise SystemExit(f"nightly run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
            result["worker_disk_bytes"] = {pool: {name: _du_bytes(path) for name, path in w.dirs.items()}
                                           for pool, w in cluster.workers.items()}
            local = {**tiny_config_dict(sources, str(scratch / "local-home"))}
            (scratch / "local.json").write_text(json.dumps(local))
            env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PREFECT_API_URL": cluster.api_url}
            for label in ("local_cold_s", "local_cached_s"):
                result[label], summary = _local_run(scratch / "local.json", env)
            result["local_cached_states"] = sorted({s["state"] for s in summary["steps"].values()})
        httpd.shutdown()
        result["load_after"] = os.getloadavg()[0]
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
