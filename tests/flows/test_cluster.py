"""The deployments across a local cluster (deployments/cluster.py), every part real: PostgreSQL, S3 (moto),
a Prefect server on that PostgreSQL, `prefect deploy`, and a cpu and a gpu worker that share no local
directory: each has its own HOME, TMPDIR, PREFECT_HOME and working directory, gets the code from the
git_clone pull step and the data from the s3:// data home. The tiny archives come from a loopback HTTP
server, since the workers cannot read the test's files."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from unittest import mock

import pytest

from deployments.cluster import SNAPSHOT_BRANCH, local_cluster, snapshot_repository
from tests import servers
from tests.flows.conftest import REPO_ROOT, tiny_config_dict

pytestmark = pytest.mark.timeout(900)

GIT_CLONE = "prefect.deployments.steps.git_clone"
PARENT_STEPS = {"download", "corpus", "glove", "tokens", "embeddings"}  # task names; download runs twice
CHILD_STEPS = {"train", "evaluate"}  # on the gpu worker
STEPS_IN_ORDER = ("corpus", "download", "download", "embeddings", "glove", "tokens", "evaluate", "train")


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def http_sources(tiny_sources):
    """The tiny archives over http://127.0.0.1 (same sha256 as the file:// ones)."""
    directory = Path(tiny_sources["corpus"]["url"].removeprefix("file://")).parent
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(directory)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield {name: {**source, "url": f"{base}/{source['filename']}"} for name, source in tiny_sources.items()}
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    for reason in (servers.postgres_unavailable(), servers.s3_unavailable(),
                   None if shutil.which("git") else "git is not installed"):
        if reason:
            pytest.skip(reason)
    code_source = {"NEWSGROUPS_LSTM_REPO": "", "NEWSGROUPS_LSTM_BRANCH": ""}  # the snapshot of this tree, always
    with mock.patch.dict(os.environ, code_source), local_cluster(base_dir=tmp_path_factory.mktemp("cluster")) as running:
        # No 03:00 UTC run during the test: turn the nightly's schedule off (its runs scheduled ahead go too).
        for deployment in running.api("/deployments/filter", {}):
            for schedule in deployment["schedules"]:
                running.api(f"/deployments/{deployment['id']}/schedules/{schedule['id']}", {"active": False}, "PATCH")
        yield running


def _flow_runs(cluster, deployment_id: str) -> list[dict]:
    """The deployment's runs that started, oldest first."""
    runs = cluster.api("/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [deployment_id]}},
                                             "sort": "START_TIME_ASC"})
    return [run for run in runs if run["start_time"]]


def _step_states(cluster, flow_run_id: str, steps: set[str]) -> list[tuple[str, str]]:
    """(task name, state name) of the flow run's step tasks, as the API records them."""
    runs = cluster.api("/task_runs/filter", {"task_runs": {"flow_run_id": {"any_": [flow_run_id]}}})
    named = sorted((run["task_key"].rsplit("-", 1)[0], run["state"]["name"]) for run in runs)  # key: <task name>-<hash>
    return [(name, state) for name, state in named if name in steps]


def test_deployments_name_a_repository_not_a_local_path(cluster):
    deployments = {(d["name"], d["work_pool_name"]): d for d in cluster.api("/deployments/filter", {})}
    assert set(deployments) == {("nightly", "cpu"), ("gpu", "gpu")}
    nightly = deployments[("nightly", "cpu")]
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 3 * * *"]
    assert nightly["parameters"]["train_deployment"] == "train-lstm/gpu"
    assert nightly["global_concurrency_limit"]["limit"] == 1  # one nightly at a time
    for deployment in deployments.values():
        assert deployment["pull_steps"] == [{GIT_CLONE: {"repository": cluster.repository, "branch": SNAPSHOT_BRANCH}}]
    assert cluster.repository.startswith("file://") and str(REPO_ROOT) not in cluster.repository


def test_nightly_trains_on_the_gpu_worker_and_a_second_run_is_cached(cluster, http_sources):
    config = tiny_config_dict(http_sources, cluster.data_home)
    first = cluster.run_nightly({"config": config}, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:] + _worker_logs(cluster)

    deployments = {d["name"]: d["id"] for d in cluster.api("/deployments/filter", {})}
    [parent] = _flow_runs(cluster, deployments["nightly"])
    [child] = _flow_runs(cluster, deployments["gpu"])
    assert (parent["work_pool_name"], parent["state_type"]) == ("cpu", "COMPLETED")
    assert (child["work_pool_name"], child["state_type"]) == ("gpu", "COMPLETED")
    assert child["parameters"]["data_home"] == cluster.data_home
    steps = _step_states(cluster, parent["id"], PARENT_STEPS) + _step_states(cluster, child["id"], CHILD_STEPS)
    assert [name for name, _ in steps] == [*STEPS_IN_ORDER] and {state for _, state in steps} == {"Completed"}
    # Each run loaded its code through the pull step, in the worker's own fresh working directory.
    for run in (parent, child):
        logs = [log["message"] for log in cluster.api("/logs/filter", {"logs": {"flow_run_id": {"any_": [run["id"]]}}})]
        assert any("Running 1 deployment pull step" in message for message in logs), logs[:20]
    # The artifacts are in the bucket, where any worker finds them.
    bucket, prefix = cluster.data_home.removeprefix("s3://").split("/", 1)
    keys = _s3_keys(cluster.env, bucket, prefix)
    for step in ("corpus", "glove", "tokens", "embeddings", "train", "evaluate"):
        assert any(key.startswith(f"{prefix}/{step}/") and key.endswith("/manifest.json") for key in keys), (step, keys)

    second = cluster.run_nightly({"config": config}, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:] + _worker_logs(cluster)
    parent2 = _flow_runs(cluster, deployments["nightly"])[-1]
    child2 = _flow_runs(cluster, deployments["gpu"])[-1]
    assert parent2["id"] != parent["id"] and child2["work_pool_name"] == "gpu"
    steps = _step_states(cluster, parent2["id"], PARENT_STEPS) + _step_states(cluster, child2["id"], CHILD_STEPS)
    assert steps == [(name, "Cached") for name in STEPS_IN_ORDER]
    assert _s3_keys(cluster.env, bucket, prefix) == keys  # nothing rebuilt, nothing lost
    for pool, worker in cluster.workers.items():
        print(f"{pool} worker keeps {_du(worker.root)} after two runs")


def test_deploy_fails_at_once_for_a_branch_the_repository_lacks(cluster):
    done = cluster.prefect("--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml", check=False,
                           env={"NEWSGROUPS_LSTM_REPO": cluster.repository, "NEWSGROUPS_LSTM_BRANCH": "no-such-branch"},
                           timeout=300)
    assert done.returncode != 0
    assert f"no branch 'no-such-branch' in {cluster.repository}" in done.stdout + done.stderr
    pulls = [d["pull_steps"][0][GIT_CLONE]["branch"] for d in cluster.api("/deployments/filter", {})]
    assert pulls == [SNAPSHOT_BRANCH, SNAPSHOT_BRANCH]  # the deployed ones are untouched


def test_snapshot_repository_holds_the_working_tree_less_ignored_files(tmp_path):
    source = tmp_path / "checkout"
    (source / "flows").mkdir(parents=True)
    (source / "flows" / "pipeline.py").write_text("# not committed anywhere\n")
    (source / ".gitignore").write_text(".venv/\n")
    (source / ".venv").mkdir()
    (source / ".venv" / "big").write_text("x")
    url = snapshot_repository(source, tmp_path / "code.git")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--branch", SNAPSHOT_BRANCH, url, str(clone)], check=True, timeout=60)
    assert (clone / "flows" / "pipeline.py").read_text() == "# not committed anywhere\n"
    assert not (clone / ".venv").exists()


def _s3_keys(env: dict, bucket: str, prefix: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"])
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def _du(path: Path) -> str:
    return subprocess.run(["du", "-sh", str(path)], capture_output=True, text=True).stdout.split()[0]


def _worker_logs(cluster) -> str:
    return "".join(f"\n--- {pool} worker ---\n{w.log.read_text()[-3000:]}" for pool, w in cluster.workers.items())
