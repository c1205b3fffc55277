"""Whole runs in child processes: SIGKILLed mid-run then rerun; two runs at once on one data home."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from storage.artifacts import ArtifactStore
from tests.flows.conftest import REPO_ROOT, tiny_config_dict


def start_run(tmp_path: Path, config: dict, env: dict, name: str, *extra: str) -> subprocess.Popen:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    log = open(tmp_path / f"{name}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "-c", str(path), "--json", *extra],
                            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def assert_store_is_sound(home: str) -> list[dict]:
    """Every published artifact verifies (sizes and sha256); no staging directory is left as an artifact."""
    store = ArtifactStore(home)
    manifests = store.list()
    for m in manifests:
        assert store.find(m["step"], m["key"], verify=True) is not None, f"{m['step']}/{m['key']} is corrupt"
    return manifests


def test_a_run_killed_mid_training_then_rerun_completes_with_sound_artifacts(tiny_sources, home, tmp_path,
                                                                             subprocess_env):
    config = tiny_config_dict(tiny_sources, home)
    config["train"]["epochs"] = 3  # long enough to be killed inside training
    child = start_run(tmp_path, config, subprocess_env, "killed")
    runs = Path(home) / "train"
    deadline = time.monotonic() + 240
    while not (runs.is_dir() and any(p.name.startswith(".") and not p.name.startswith(".locks") for p in runs.iterdir())):
        assert child.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    assert not (runs.is_dir() and any(not p.name.startswith(".") for p in runs.iterdir())), "run published early"
    assert_store_is_sound(home)

    rerun = start_run(tmp_path, config, subprocess_env, "rerun")
    assert rerun.wait(timeout=300) == 0, (tmp_path / "rerun.log").read_text()[-3000:]
    summary = json.loads(_json_tail((tmp_path / "rerun.log").read_text()))
    states = {name: s["state"] for name, s in summary["steps"].items()}
    assert states["tokens"] == "Cached" and states["train"] == "Completed", states  # finished steps are reused
    manifests = assert_store_is_sound(home)
    assert {m["step"] for m in manifests} >= {"download", "corpus", "glove", "tokens", "embeddings", "train",
                                              "evaluate"}


def test_two_concurrent_runs_on_one_data_home_both_succeed(tiny_sources, home, tmp_path, subprocess_env):
    config = tiny_config_dict(tiny_sources, home)
    children = [start_run(tmp_path, config, subprocess_env, f"run{i}", "--until", "embeddings") for i in range(2)]
    codes = [c.wait(timeout=300) for c in children]
    logs = [(tmp_path / f"run{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], "\n".join(log[-2000:] for log in logs)
    summaries = [json.loads(_json_tail(log)) for log in logs]
    assert summaries[0]["artifacts"] == summaries[1]["artifacts"]
    manifests = assert_store_is_sound(home)
    keys = [(m["step"], m["key"]) for m in manifests]
    assert len(keys) == len(set(keys)) == 6  # 2 downloads, corpus, glove, tokens, embeddings: each built once


def _json_tail(log: str) -> str:
    """The --json summary printed last (progress lines come before it)."""
    return log[log.index("\n{") + 1:] if not log.startswith("{") else log
