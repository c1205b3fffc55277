"""The CLI in a child process, stopped by SIGTERM/SIGINT (exit within 5 s, rerun resumes) or killed with
SIGKILL (no stray temporary Prefect API server)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.flows.conftest import REPO_ROOT, tiny_config_dict
from tests.storage._http_server import Server, full, half_then_reset, status


def start_cli(tmp_path: Path, name: str, config: dict, env: dict, *args: str) -> subprocess.Popen:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    log = open(tmp_path / f"{name}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args, "-c", str(path)], cwd=REPO_ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def wait_for_line(proc: subprocess.Popen, log: Path, text: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert proc.poll() is None, f"exited {proc.returncode} before {text!r}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {text!r} within {timeout} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


def stop_and_time(proc: subprocess.Popen, sig: int) -> float:
    started = time.monotonic()
    proc.send_signal(sig)
    try:
        proc.wait(timeout=30)
    finally:
        proc.kill()
    return time.monotonic() - started


def ephemeral_env() -> dict:
    """No PREFECT_API_URL and no background server (NEWSGROUPS_LSTM_SERVER_IDLE_MINUTES=0): the CLI's Prefect
    starts its own temporary API server as a child process."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return {**env, "PYTHONPATH": str(REPO_ROOT), "PREFECT_LOGGING_LEVEL": "WARNING", "NEWSGROUPS_LSTM_SERVER_IDLE_MINUTES": "0"}


def api_servers(pid: int) -> list[psutil.Process]:
    try:
        return [p for p in psutil.Process(pid).children(recursive=True) if "uvicorn" in " ".join(p.cmdline())]
    except psutil.NoSuchProcess:
        return []


def assert_gone(process: psutil.Process, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, f"stray process {process.pid}: {' '.join(process.cmdline())}"
        time.sleep(0.1)


@pytest.fixture
def glove_server(tiny_sources):
    """The tiny GloVe zip behind a loopback server that first cuts the body in half, then answers 503
    Retry-After: 300 until the test fixes it."""
    body = Path(tiny_sources["glove"]["url"].removeprefix("file://")).read_bytes()
    with Server([half_then_reset, status(503, {"Retry-After": "300"})], body=body) as srv:
        yield srv


def test_sigterm_in_a_retry_after_sleep_exits_143_within_5s_stops_the_api_server_and_a_rerun_resumes(
        tiny_sources, home, tmp_path, glove_server, subprocess_env):
    config = tiny_config_dict(tiny_sources, home)
    config["sources"]["glove"]["url"] = glove_server.url
    child = start_cli(tmp_path, "stopped", config, ephemeral_env(), "data")
    wait_for_line(child, tmp_path / "stopped.log", "retrying in 60.0 s")  # Retry-After 300, capped at 60
    servers = api_servers(child.pid)
    assert len(servers) == 1  # Prefect's temporary API server, a child of the CLI
    assert stop_and_time(child, signal.SIGTERM) < 5
    out = (tmp_path / "stopped.log").read_text()
    assert child.returncode == 143, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("newsgroups-lstm: stopped by SIGTERM: download of http://127.0.0.1") and "resumes" in last
    assert "Traceback" not in out
    assert_gone(servers[0], timeout=2)
    parts = list(Path(home).glob("download/.work-*/glove.6B.zip.part"))
    assert len(parts) == 1 and parts[0].stat().st_size == len(glove_server.body) // 2  # kept for the rerun
    assert not (Path(home) / "glove").exists()  # nothing half-done published

    glove_server.script = [full]  # the server is fixed
    rerun = start_cli(tmp_path, "rerun", config, subprocess_env, "data")
    assert rerun.wait(timeout=240) == 0, (tmp_path / "rerun.log").read_text()[-3000:]
    assert len(glove_server.log) == 3 and glove_server.log[-1]["Range"] == f"bytes={len(glove_server.body) // 2}-"
    assert (tmp_path / "rerun.log").read_text().count("Completed") >= 3


def test_sigint_during_training_exits_130_within_5s_and_the_rerun_resumes_from_the_last_epoch(
        tiny_sources, home, tmp_path, subprocess_env):
    config = tiny_config_dict(tiny_sources, home)
    # epochs after the first take ~0.3 s each; no refit, so every "epoch i/20" line is the first training's
    config["train"].update(epochs=20, patience=100, refit=False)
    child = start_cli(tmp_path, "stopped", config, subprocess_env, "run")
    wait_for_line(child, tmp_path / "stopped.log", "epoch 1/20")
    assert stop_and_time(child, signal.SIGINT) < 5
    out = (tmp_path / "stopped.log").read_text()
    assert child.returncode == 130, out[-3000:]
    assert out.strip().splitlines()[-1].startswith("newsgroups-lstm: stopped by SIGINT: training stopped")
    assert not (Path(home) / "train").exists() or not [p for p in (Path(home) / "train").iterdir()
                                                         if not p.name.startswith(".")]  # no run published

    rerun = start_cli(tmp_path, "rerun", config, subprocess_env, "run")
    assert rerun.wait(timeout=240) == 0, (tmp_path / "rerun.log").read_text()[-3000:]
    log = (tmp_path / "rerun.log").read_text()
    assert "resuming from ckpt-" in log and "epoch 20/20" in log and "epoch 1/20" not in log


def test_kill_9_of_the_cli_leaves_no_temporary_api_server(tiny_sources, home, tmp_path, glove_server):
    config = tiny_config_dict(tiny_sources, home)
    config["sources"]["glove"]["url"] = glove_server.url
    child = start_cli(tmp_path, "killed", config, ephemeral_env(), "data")
    wait_for_line(child, tmp_path / "killed.log", "retrying in")
    servers = api_servers(child.pid)
    assert len(servers) == 1
    child.kill()
    child.wait(timeout=10)
    assert_gone(servers[0], timeout=8)  # the lifeline notices within 0.2 s, then terminate, kill after 3 s
