"""The Prefect UI in a real browser: a real server (PostgreSQL), the pipeline deployed from
deployments/prefect.yaml and run by a process worker (which clones a snapshot of this tree) on the tiny
data, then headless Chromium checks what a person sees: the deployment's run form explains every field,
and the run's Artifacts tab holds the evaluation. Screenshots go to the test's tmp dir (path printed)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tasks.config import TrainConfig
from tests.flows.conftest import REPO_ROOT, tiny_config_dict

PREFECT = str(Path(sys.executable).with_name("prefect"))
EPOCHS_HELP = TrainConfig.model_fields["epochs"].description
ARTIFACT_KEYS = ("evaluation-summary", "evaluation-per-class", "evaluation-confusion", "training-curves")


def _api(url: str, path: str, body: dict | None = None):
    request = urllib.request.Request(url + path, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _prefect(env: dict, *args: str, timeout: float = 240) -> str:
    done = subprocess.run([PREFECT, *args], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done.stdout


@pytest.fixture
def pipeline_run(prefect_server, tiny_sources, home, tmp_path):
    """The nightly deployment run once on the tiny data by a `prefect worker` (training in the worker's flow run)."""
    from deployments.cluster import SNAPSHOT_BRANCH, snapshot_repository

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(prefect_server.client_env, PREFECT_HOME=str(tmp_path / "client-home"), PYTHONPATH=str(REPO_ROOT),
               PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="WARNING",
               # the worker clones this tree as it is (the deployments' git_clone pull step)
               NEWSGROUPS_LSTM_REPO=snapshot_repository(REPO_ROOT, tmp_path / "code.git"),
               NEWSGROUPS_LSTM_BRANCH=SNAPSHOT_BRANCH)
    _prefect(env, "work-pool", "create", "cpu", "--type", "process", "--overwrite")
    _prefect(env, "--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--name", "nightly")
    worker_dir = tmp_path / "worker"
    worker_dir.mkdir()
    with open(tmp_path / "worker.log", "w") as log:
        worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "cpu", "--type", "process"], env=env,
                                  cwd=worker_dir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        params = {"config": tiny_config_dict(tiny_sources, home), "train_deployment": None}
        done = subprocess.run([PREFECT, "deployment", "run", "newsgroups-pipeline/nightly", "--params", json.dumps(params),
                               "--watch", "--watch-timeout", "300"], env=env, cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=330)
        assert done.returncode == 0, done.stdout[-2000:] + (tmp_path / "worker.log").read_text()[-3000:]
    finally:
        from tests.servers import stop_process

        stop_process(worker)
    deployment = next(d for d in _api(prefect_server.api_url, "/deployments/filter", {}) if d["name"] == "nightly")
    run = _api(prefect_server.api_url, f"/flow_runs/{re.search(r'UUID: ([0-9a-f-]{36})', done.stdout).group(1)}")
    assert run["state_type"] == "COMPLETED" and run["deployment_id"] == deployment["id"]
    return deployment, run


def test_the_ui_explains_the_run_form_and_shows_the_evaluation_on_the_run(prefect_server, chromium, pipeline_run,
                                                                          tmp_path, home):
    import time

    from tests.servers import chromium_browser

    started = time.monotonic()
    deployment, run = pipeline_run
    metrics = json.loads(next(Path(home, "evaluate").glob("*/metrics.json")).read_text())
    ui = prefect_server.ui_url
    print(f"screenshots: {tmp_path}")
    with chromium_browser(chromium) as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(30_000)

        # (a) the deployment's custom-run form: every field with its description
        page.goto(f"{ui}/deployments/deployment/{deployment['id']}/run")
        page.get_by_text(EPOCHS_HELP).wait_for()
        for text in ("Everything the run depends on", "Dimension of the GloVe 6B word vectors",
                     "Stop after this stage"):
            assert page.get_by_text(text).count() >= 1, text
        page.screenshot(path=tmp_path / "deployment-run-form.png", full_page=True)

        # (b) the pipeline run's Artifacts tab lists the evaluation, and each artifact shows it
        page.goto(f"{ui}/runs/flow-run/{run['id']}")
        page.get_by_text("Artifacts", exact=True).first.click()
        for key in ARTIFACT_KEYS:
            page.get_by_text(key, exact=True).first.wait_for()
        page.screenshot(path=tmp_path / "run-artifacts-tab.png", full_page=True)

        page.get_by_text("evaluation-summary", exact=True).first.click()
        page.wait_for_url("**/artifacts/artifact/**")
        page.get_by_text(f"accuracy: {metrics['accuracy']:.4f}").wait_for()
        page.screenshot(path=tmp_path / "evaluation-summary.png", full_page=True)
        shown = page.inner_text("main") if page.locator("main").count() else page.inner_text("body")
        assert "Sources" in shown and "sha256" in shown and "talk.politics" in shown, shown[:3000]

        # the confusion artifact (listed on the tab above) opened by its address, as its link does
        confusion = _api(prefect_server.api_url, "/artifacts/filter", {"artifacts": {
            "flow_run_id": {"any_": [run["id"]]}, "key": {"any_": ["evaluation-confusion"]}}})
        assert len(confusion) == 1, confusion
        page.goto(f"{ui}/artifacts/artifact/{confusion[0]['id']}")
        image = page.locator("img[alt^='confusion matrix']")
        image.wait_for()
        assert image.evaluate("img => img.complete && img.naturalWidth") > 100  # the PNG decoded and drew
        assert page.get_by_text("1 rec.autos").count() == 1  # the table, with group names
        page.screenshot(path=tmp_path / "evaluation-confusion.png", full_page=True)
    print(f"browser checks: {time.monotonic() - started:.1f} s")
