"""The CLI without PREFECT_API_URL: the first command starts a local Prefect server in the background, the next
reuse it (a cached rerun imports no training library), the runs are recorded there, and it stops when idle."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from storage import prefect_api
from tests.flows.conftest import REPO_ROOT, tiny_config_dict

TRAINING_LIBRARIES = ("tensorflow", "keras", "jax", "torch")
TF_NOISE = re.compile(r"absl::InitializeLog|oneDNN|cuda|cuInit|^[IWEF]\d{4} \d\d:\d\d:", re.MULTILINE | re.IGNORECASE)


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory) -> Path:
    """One PREFECT_HOME for the module (its database is created once); no server left running afterwards."""
    home = tmp_path_factory.mktemp("prefect-home")
    yield home
    prefect_api.stop(home)


def _cli(prefect_home: Path, *args: str, idle_minutes: str = "5", python: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}  # no API configured
    env.update(PREFECT_HOME=str(prefect_home), PYTHONPATH=str(REPO_ROOT), NEWSGROUPS_LSTM_SERVER_IDLE_MINUTES=idle_minutes)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # the CLI's own default, as for a user
    return subprocess.run([sys.executable, *python, "-m", "flows.cli", *args], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=420)


def _api(url: str, path: str, body: dict | None = None):
    request = urllib.request.Request(url + path, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_the_local_server_is_reused_and_a_cached_rerun_imports_no_training_library(prefect_home, tiny_sources, home,
                                                                                   tmp_path):
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps(tiny_config_dict(tiny_sources, home)))

    first = _cli(prefect_home, "run", "-c", str(config), "--json")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "train: Completed" in first.stderr and "evaluate: Completed" in first.stderr  # plain lines: no terminal
    assert TF_NOISE.search(first.stderr) is None, first.stderr  # TensorFlow loaded and trained, silently
    server = prefect_api.running(prefect_home)
    assert server is not None, (prefect_home / prefect_api.LOG).read_text()[-2000:]

    second = _cli(prefect_home, "run", "-c", str(config), "--json", python=("-X", "importtime"))
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads(second.stdout)
    assert {name: step["state"] for name, step in summary["steps"].items()} == dict.fromkeys(summary["steps"], "Cached")
    imported = {line.rsplit("|", 1)[1].strip() for line in second.stderr.splitlines() if line.startswith("import time:")}
    assert "flows.pipeline" in imported  # the importtime output is there to inspect
    assert sorted(m for m in imported if m.split(".")[0] in TRAINING_LIBRARIES) == []
    assert prefect_api.running(prefect_home)["pid"] == server["pid"]  # the same server answered both commands

    # Recorded where a person can look: the run, with the evaluation (rebuilt from the cached files) and its sources.
    run = summary["flow_run"]
    assert run["ui_url"] == f"{server['url'].removesuffix('/api')}/runs/flow-run/{run['id']}"
    assert _api(server["url"], f"/flow_runs/{run['id']}")["state"]["type"] == "COMPLETED"
    artifacts = {a["key"]: a for a in _api(server["url"], "/artifacts/filter",
                                           {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})}
    assert {"evaluation-summary", "evaluation-per-class", "evaluation-confusion", "training-curves"} <= set(artifacts)
    for source in tiny_sources.values():
        assert source["url"] in artifacts["evaluation-summary"]["data"]
        assert source["sha256"] in artifacts["evaluation-summary"]["data"]

    stopped = _cli(prefect_home, "server", "stop")
    assert stopped.returncode == 0 and server["url"] in stopped.stdout
    assert prefect_api.running(prefect_home) is None and not _alive(server["pid"])


def test_the_local_server_stops_itself_when_idle(prefect_home):
    started = _cli(prefect_home, "server", "start", idle_minutes="0.05")  # 3 s
    assert started.returncode == 0, started.stderr[-2000:]
    state = prefect_api.read_state(prefect_home)
    assert state is not None and prefect_api.healthy(state["url"])
    deadline = time.monotonic() + 60
    while _alive(state["pid"]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _alive(state["pid"]), "the idle server did not stop"
    assert prefect_api.read_state(prefect_home) is None  # and said so
    status = _cli(prefect_home, "server", "status")
    assert status.returncode == 1 and "no local Prefect server" in status.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie (exited, not yet reaped by init) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True
