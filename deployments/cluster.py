"""A local Prefect cluster to try the deployments on one machine, with nothing shared but the network.

Starts on 127.0.0.1: PostgreSQL, an S3-compatible store (moto_server), a Prefect server on that
PostgreSQL; creates the `cpu` and `gpu` process work pools; runs `prefect deploy --all` on
deployments/prefect.yaml; starts one worker per pool. Each worker has its own HOME, TMPDIR,
PREFECT_HOME and working directory and no PYTHONPATH: it gets the code from the deployments' git_clone
pull step and the data from the s3:// data home, as a worker on another host would. Everything stops
(and its data is deleted) on exit: Ctrl-C, SIGTERM, or a failure while starting.

    python deployments/cluster.py                        # start, print the UI URL and the env, wait for Ctrl-C
    python deployments/cluster.py --run-nightly --exit   # also run newsgroups-pipeline/nightly once and wait

The workers clone NEWSGROUPS_LSTM_REPO at NEWSGROUPS_LSTM_BRANCH when set (deployments/source.sh), else a
snapshot of this working tree (committed or not) written to a bare repository in the cluster's directory.
Sources come from the config (`--params`) or from NEWSGROUPS_LSTM_GLOVE_URL / _CORPUS_URL (+ _SHA256) in
this environment, which the workers inherit.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make `deployments.servers` importable
    sys.path.insert(0, str(REPO_ROOT))

from deployments.servers import (  # noqa: E402
    ServerStartError,
    ServerUnavailable,
    postgres_server,
    prefect_server,
    s3_server,
    stop_process,
    venv_script,
)

POOLS = ("cpu", "gpu")
NIGHTLY = "newsgroups-pipeline/nightly"
BUCKET = "newsgroups-lstm"
SNAPSHOT_BRANCH = "cluster"
# Not inherited from this shell: another Prefect or AWS setup, another data home or code source.
NOT_INHERITED_PREFIXES = ("PREFECT_", "AWS_")
NOT_INHERITED = {"NEWSGROUPS_LSTM_HOME", "NEWSGROUPS_LSTM_REPO", "NEWSGROUPS_LSTM_BRANCH"}


class ClusterError(RuntimeError):
    """A step of bringing the cluster up failed; the message names it and carries its output."""


@dataclasses.dataclass(frozen=True)
class Worker:
    pool: str
    root: Path  # home/, tmp/, prefect/, work/: the worker's only local directories
    log: Path  # outside `root`, so `du root` is what the worker itself keeps
    process: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def dirs(self) -> dict[str, Path]:
        return {"HOME": self.root / "home", "TMPDIR": self.root / "tmp", "PREFECT_HOME": self.root / "prefect",
                "cwd": self.root / "work"}


@dataclasses.dataclass(frozen=True)
class Cluster:
    root: Path
    api_url: str
    ui_url: str
    data_home: str
    repository: str
    branch: str
    env: dict[str, str]  # for a client here: the prefect CLI, newsgroups-lstm inspect/predict on the data home
    workers: dict[str, Worker]
    seconds: dict[str, float]  # start-up time of each part

    def api(self, path: str, body: dict | None = None, method: str | None = None):
        """GET (or POST `body` to) the Prefect REST API; the decoded JSON (None for an empty answer)."""
        request = urllib.request.Request(self.api_url + path, method=method or ("GET" if body is None else "POST"),
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = response.read()
        return json.loads(answer) if answer else None

    def prefect(self, *args: str, timeout: float = 600, check: bool = True, env: dict | None = None):
        """The prefect CLI against this cluster, from the repository root; raises ClusterError on failure."""
        done = subprocess.run([_prefect_command(), *args], cwd=REPO_ROOT, env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and done.returncode != 0:
            raise ClusterError(f"prefect {' '.join(args)} exited {done.returncode}:\n"
                               f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done

    def run_nightly(self, params: dict | None = None, timeout: int = 1800) -> subprocess.CompletedProcess:
        """`prefect deployment run newsgroups-pipeline/nightly --watch`: the CLI's result (exit 0: Completed)."""
        extra = ["--params", json.dumps(params)] if params else []
        return self.prefect("deployment", "run", NIGHTLY, *extra, "--watch", "--watch-interval", "1",
                            "--watch-timeout", str(timeout), timeout=timeout + 60, check=False)


def _prefect_command() -> str:
    return venv_script("prefect") or "prefect"


def _git(*args: str, cwd: Path | None = None) -> str:
    done = subprocess.run(["git", "-c", "user.name=newsgroups-lstm cluster", "-c", "user.email=cluster@localhost",
                           *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise ClusterError(f"git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def snapshot_repository(source: Path, dest: Path, branch: str = SNAPSHOT_BRANCH) -> str:
    """Commit `source`'s files (tracked or not, less what .gitignore excludes) to a new bare repository
    `dest` on `branch`; its file:// URL. Works on a checkout without .git too."""
    _git("init", "-q", "--bare", f"--initial-branch={branch}", str(dest))
    tree = [f"--git-dir={dest}", f"--work-tree={source}"]
    _git(*tree, "add", "-A", ".")
    _git(*tree, "commit", "-q", "--no-verify", "-m", f"snapshot of {source}")
    return dest.as_uri()


def _client_env(root: Path, api_url: str, s3_env: dict[str, str], data_home: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(NOT_INHERITED_PREFIXES) and k not in NOT_INHERITED}
    env.update(s3_env, PREFECT_API_URL=api_url, PREFECT_HOME=str(root / "client-prefect"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", NEWSGROUPS_LSTM_HOME=data_home)
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]  # the deploying client loads the flows from this checkout
    return env


@contextlib.contextmanager
def start_worker(pool: str, root: Path, log: Path, client_env: dict[str, str], query_seconds: float = 2.0
                 ) -> Iterator[Worker]:
    """`prefect worker start --pool <pool>` with private HOME/TMPDIR/PREFECT_HOME/cwd and no PYTHONPATH."""
    worker = Worker(pool=pool, root=root, log=log)
    for path in worker.dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in client_env.items() if k != "PYTHONPATH"}
    env.update({name: str(path) for name, path in worker.dirs.items() if name != "cwd"},
               PREFECT_WORKER_QUERY_SECONDS=str(query_seconds))
    with open(log, "wb") as out:
        process = subprocess.Popen([_prefect_command(), "worker", "start", "--pool", pool, "--type", "process",
                                    "--name", f"{pool}-worker"], cwd=worker.dirs["cwd"], env=env, stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        yield dataclasses.replace(worker, process=process)
    finally:
        stop_process(process)


def _wait_online(cluster: Cluster, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    for pool, worker in cluster.workers.items():
        while not any(w["status"] == "ONLINE" for w in cluster.api(f"/work_pools/{pool}/workers/filter", {})):
            if time.monotonic() > deadline or worker.process is None or worker.process.poll() is not None:
                raise ClusterError(f"the {pool} worker did not come online:\n{worker.log.read_text()[-3000:]}")
            time.sleep(0.5)


@contextlib.contextmanager
def local_cluster(base_dir: str | os.PathLike | None = None) -> Iterator[Cluster]:
    """Bring the cluster up (servers, pools, deployments, workers); on exit stop it all and delete its data.

    The code: NEWSGROUPS_LSTM_REPO at NEWSGROUPS_LSTM_BRANCH (as `prefect deploy` reads them), else a
    snapshot of this working tree."""
    root = Path(tempfile.mkdtemp(prefix="nglstm-cluster-", dir=base_dir))
    seconds: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, root, ignore_errors=True)
        postgres = stack.enter_context(postgres_server())  # in the system temp dir: the postgres account must reach it
        s3 = stack.enter_context(s3_server(log_dir=base_dir))
        prefect = stack.enter_context(prefect_server(database_url=postgres.url, base_dir=base_dir))
        seconds.update(postgres=postgres.startup_seconds, s3=s3.startup_seconds, prefect=prefect.startup_seconds)
        data_home = f"s3://{s3.create_bucket(BUCKET)}/home"
        repository, branch = os.environ.get("NEWSGROUPS_LSTM_REPO"), os.environ.get("NEWSGROUPS_LSTM_BRANCH", "")
        if not repository:
            repository, branch = snapshot_repository(REPO_ROOT, root / "code.git"), SNAPSHOT_BRANCH
        cluster = Cluster(root=root, api_url=prefect.api_url, ui_url=prefect.ui_url, data_home=data_home,
                          repository=repository, branch=branch, workers={}, seconds=seconds,
                          env=_client_env(root, prefect.api_url, s3.env, data_home))
        started = time.monotonic()
        for pool in POOLS:
            cluster.prefect("work-pool", "create", pool, "--type", "process", "--overwrite")
        source = {"NEWSGROUPS_LSTM_REPO": repository, **({"NEWSGROUPS_LSTM_BRANCH": branch} if branch else {})}
        cluster.prefect("--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml", env=source)
        seconds["deploy"] = time.monotonic() - started
        if not branch:  # source.sh chose this checkout's branch: show what the deployments say
            branch = cluster.api("/deployments/filter", {})[0]["pull_steps"][0][
                "prefect.deployments.steps.git_clone"]["branch"]
        started = time.monotonic()
        (root / "logs").mkdir()
        workers = {pool: stack.enter_context(start_worker(pool, root / pool, root / "logs" / f"{pool}-worker.log",
                                                          cluster.env)) for pool in POOLS}
        cluster = dataclasses.replace(cluster, workers=workers, branch=branch)
        _wait_online(cluster)
        seconds["workers"] = time.monotonic() - started
        yield cluster


def describe(cluster: Cluster) -> str:
    """What to tell a person: where the UI is, the env for another shell, the commands to try."""
    exports = {k: cluster.env[k] for k in ("PREFECT_API_URL", "NEWSGROUPS_LSTM_HOME") if k in cluster.env}
    exports.update({k: v for k, v in cluster.env.items() if k.startswith("AWS_")})
    lines = [
        f"Prefect UI     {cluster.ui_url}   (server on PostgreSQL; started in "
        + ", ".join(f"{part} {s:.1f} s" for part, s in cluster.seconds.items()) + ")",
        f"data home      {cluster.data_home}   (S3 at {cluster.env['AWS_ENDPOINT_URL']})",
        f"code           {cluster.repository} @ {cluster.branch}   (the git_clone pull step of every run)",
        *(f"{pool} worker     pid {w.pid}; HOME, TMPDIR, PREFECT_HOME under {w.root}; log {w.log}"
          for pool, w in cluster.workers.items()),
        "",
        "In another shell, from this checkout:",
        *(f"  export {k}={v}" for k, v in exports.items()),
        f"  prefect deployment run {NIGHTLY} --watch",
        "  newsgroups-lstm inspect",
        "",
    ]
    return "\n".join(lines)


def _stop_on_signals() -> None:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so every context manager stops what it started. SIGINT gets
    Python's handler even when started in the background (`&` ignores it): the servers and workers would
    otherwise inherit the ignored SIGINT, and a Prefect worker shuts down through SIGINT."""
    def handler(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, signal.default_int_handler)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python deployments/cluster.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-nightly", action="store_true", help=f"run {NIGHTLY} once and wait for it")
    parser.add_argument("--params", type=json.loads, default=None,
                        help='JSON parameters for that run, e.g. \'{"config": {"train": {"epochs": 1}}}\'')
    parser.add_argument("--exit", action="store_true", help="stop the cluster after the run (exit code: the run's)")
    parser.add_argument("--base-dir", help="where the cluster's temporary directories go (default: the system temp dir)")
    args = parser.parse_args(argv)
    _stop_on_signals()
    code = 0
    try:
        with local_cluster(base_dir=args.base_dir) as cluster:
            print(describe(cluster), flush=True)
            if args.run_nightly:
                started = time.monotonic()
                done = cluster.run_nightly(args.params)
                print(done.stdout[-4000:], done.stderr[-2000:], sep="\n", flush=True)
                print(f"{NIGHTLY}: exit {done.returncode} after {time.monotonic() - started:.1f} s", flush=True)
                code = done.returncode
            if not args.exit:
                print("Ctrl-C stops the cluster and deletes its data.", flush=True)
                signal.pause()
    except KeyboardInterrupt:
        print("stopping ...", file=sys.stderr, flush=True)
    except (ClusterError, ServerUnavailable, ServerStartError) as err:
        print(f"cluster: {err}", file=sys.stderr, flush=True)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
