"""The GPU-pool path for real: `prefect server start`, a process work pool `gpu`, `prefect deploy` from
deployments/prefect.yaml, `prefect worker start --pool gpu`, and the pipeline handing training to it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from storage.artifacts import ArtifactStore
from tests.flows.conftest import REPO_ROOT, tiny_config_dict

PREFECT = str(Path(sys.executable).with_name("prefect"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(url: str, path: str, body: dict | None = None):
    request = urllib.request.Request(f"{url}{path}", data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A real Prefect server on a free loopback port with its own PREFECT_HOME (SQLite)."""
    root = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(root / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false",
               PREFECT_LOGGING_LEVEL="WARNING")
    log = open(root / "server.log", "w")
    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 240
    while True:
        try:
            _api(url, "/health")
            break
        except OSError:
            assert server.poll() is None, (root / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "prefect server did not answer /api/health"
            time.sleep(0.5)
    env.update(PREFECT_API_URL=url, PREFECT_WORKER_QUERY_SECONDS="1", PYTHONPATH=str(REPO_ROOT))
    try:
        yield {"url": url, "env": env, "root": root}
    finally:
        _stop(server)


def _prefect(env: dict, *args: str, cwd: Path = REPO_ROOT) -> str:
    done = subprocess.run([PREFECT, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done.stdout


def test_training_runs_on_the_gpu_pool_worker(prefect_server, tiny_sources, home, tmp_path):
    env = prefect_server["env"]
    for pool in ("cpu", "gpu"):
        _prefect(env, "work-pool", "create", pool, "--type", "process")
    _prefect(env, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
    deployments = {(d["name"], d["work_pool_name"]): d for d in _api(prefect_server["url"], "/deployments/filter", {})}
    assert set(deployments) == {("nightly", "cpu"), ("gpu", "gpu")}
    nightly = deployments[("nightly", "cpu")]
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 3 * * *"]
    assert nightly["parameters"]["train_deployment"] == "train-lstm/gpu"
    pull = deployments[("gpu", "gpu")]["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]
    assert Path(pull["directory"]).resolve() == REPO_ROOT

    worker_dir = tmp_path / "worker"  # not the checkout: the deployment's pull step must find the code
    worker_dir.mkdir()
    worker_log = open(tmp_path / "worker.log", "w")
    worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "gpu", "--type", "process"], env=env,
                              cwd=worker_dir, stdout=worker_log, stderr=subprocess.STDOUT)
    try:
        config = tiny_config_dict(tiny_sources, home)
        path = tmp_path / "cfg.json"
        path.write_text(json.dumps(config))
        done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "-c", str(path), "--json",
                               "--train-deployment", "train-lstm/gpu"], env=env,
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=420)
        assert done.returncode == 0, done.stderr[-3000:] + (tmp_path / "worker.log").read_text()[-3000:]
    finally:
        _stop(worker)

    summary = json.loads(done.stdout)
    train = summary["steps"]["train"]
    assert train["work_pool"] == "gpu" and train["state"] == "Completed"
    children = _api(prefect_server["url"], "/flow_runs/filter",
                    {"flow_runs": {"name": {"any_": [train["flow_run"]]}}})
    assert [(c["work_pool_name"], c["state_type"]) for c in children] == [("gpu", "COMPLETED")]
    store = ArtifactStore(home)
    run = summary["artifacts"]["train"]
    assert store.find("train", run["key"], verify=True) is not None
    assert store.find("evaluate", summary["artifacts"]["evaluate"]["key"]) is not None
    assert 0.0 <= summary["metrics"]["accuracy"] <= 1.0
