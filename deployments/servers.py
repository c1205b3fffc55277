"""Real servers on 127.0.0.1 for the tests and for a local cluster: S3 (moto), PostgreSQL, the Prefect server.

Each server is a context manager that starts a real process on 127.0.0.1 on a free port, waits until it
answers, yields a small handle and, on exit, stops the process (its whole process group) and deletes its
data directory - also when the body raised. Nothing here needs pytest: `deployments/cluster.py` builds a
local cluster from these context managers; tests/conftest.py wraps them in session-scoped fixtures
(tests/servers.py re-exports them, next to the test-only Chromium lookup).

A missing dependency (no PostgreSQL binaries, moto not installed) is reported by the `*_unavailable()`
functions, or raised as `ServerUnavailable` by the context managers; the fixtures turn it into a skip with
the same message. A server that is installed but fails to start raises `ServerStartError` with the tail of
its log.

    python -m deployments.servers   # start all three, print their URLs and start-up times, stop them
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

HOST = "127.0.0.1"

class ServerUnavailable(RuntimeError):
    """A server's software is not installed here (tests skip with this message)."""


class ServerStartError(RuntimeError):
    """The software is installed but the server did not start; the message carries its log tail."""


# --------------------------------------------------------------------------------------------- helpers


def free_port(host: str = HOST) -> int:
    """A TCP port that was free a moment ago (the callers retry if another process takes it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _log_tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def _http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:  # an HTTP answer, even an error, means the server is up
        return err.code, err.read()


def _wait_until(ready: Callable[[], bool], what: str, timeout: float, process: subprocess.Popen | None = None,
                log: Path | None = None, interval: float = 0.1) -> None:
    """Poll `ready()` until true; fail early if `process` exited, and late after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ready():
                return
        except OSError:
            pass
        if process is not None and process.poll() is not None:
            raise ServerStartError(f"{what} exited with code {process.returncode} while starting:\n"
                                   f"{_log_tail(log) if log else ''}")
        if time.monotonic() > deadline:
            raise ServerStartError(f"{what} did not answer within {timeout:.0f} s:\n{_log_tail(log) if log else ''}")
        time.sleep(interval)


def _port_in_use(log: Path) -> bool:
    return bool(re.search(r"address already in use|could not bind", _log_tail(log, 20000), re.IGNORECASE))


def stop_process(process: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM the process group `process` leads (it was started with start_new_session), then SIGKILL it.

    Descendants that left the group get the same signals: a Prefect worker starts each flow run in a
    session of its own, and those must not outlive the worker.
    """
    strays = _descendants_outside_group(process.pid) if process.poll() is None else []
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        _signal_all(strays, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    # Children that outlived the leader (uvicorn, services) share its group id.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    _signal_all(strays, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)


def _descendants_outside_group(pid: int) -> list[int]:
    """The processes below `pid` (children, grandchildren...) in another process group, from `ps`."""
    try:
        table = subprocess.run(["ps", "-A", "-o", "pid=", "-o", "ppid=", "-o", "pgid="], capture_output=True,
                               text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    children: dict[int, list[tuple[int, int]]] = {}
    for line in table.splitlines():
        fields = line.split()
        if len(fields) == 3 and all(field.isdigit() for field in fields):
            children.setdefault(int(fields[1]), []).append((int(fields[0]), int(fields[2])))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child, group = todo.pop()
        if group != pid:  # the group itself gets killpg
            found.append(child)
        todo.extend(children.get(child, []))
    return found


def _signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)


def venv_script(name: str) -> str | None:
    """A console script installed next to this interpreter (the venv's bin), else on PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    return shutil.which(name)


# -------------------------------------------------------------------------------------------------- S3


@dataclasses.dataclass(frozen=True)
class S3Server:
    """A moto S3 server. `env` holds what boto3, pyarrow and the AWS CLI need to use it."""

    endpoint_url: str
    access_key_id: str = "testing"
    secret_access_key: str = "testing"
    region: str = "us-east-1"
    pid: int = 0
    startup_seconds: float = 0.0

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",  # no 1 s probes of 169.254.169.254 for credentials/region
        }

    def client(self):
        """A boto3 S3 client for this server."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key_id,
                            aws_secret_access_key=self.secret_access_key, region_name=self.region)

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh random name by default) and return its name."""
        name = name or f"test-{secrets.token_hex(6)}"
        self.client().create_bucket(Bucket=name)
        return name

    def filesystem(self):
        """A pyarrow S3FileSystem for this server."""
        from pyarrow import fs

        return fs.S3FileSystem(endpoint_override=self.endpoint_url.split("://", 1)[1], scheme="http",
                               access_key=self.access_key_id, secret_key=self.secret_access_key, region=self.region)


def s3_unavailable() -> str | None:
    """Why a moto S3 server cannot run here, or None."""
    for module in ("moto.server", "flask", "boto3"):
        if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
            return (f"moto[server] is not installed ({module} is missing): "
                    f"pip install -e '.[dev]' installs moto[server] and boto3")
    return None


@contextlib.contextmanager
def s3_server(timeout: float = 60.0, log_dir: str | os.PathLike | None = None) -> Iterator[S3Server]:
    """Run `moto_server` (in-memory S3) on a free loopback port for the duration of the block."""
    reason = s3_unavailable()
    if reason:
        raise ServerUnavailable(reason)
    root = Path(tempfile.mkdtemp(prefix="nglstm-s3-", dir=log_dir))
    log = root / "moto.log"
    process = None
    try:
        for _attempt in range(3):
            port = free_port()
            url = f"http://{HOST}:{port}"
            started = time.monotonic()
            with open(log, "wb") as out:
                process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)],
                                           stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           cwd=root, start_new_session=True)
            try:
                _wait_until(lambda url=url: _http_get(url + "/moto-api/")[0] < 500, "moto_server", timeout,
                            process, log)
                break
            except ServerStartError:
                stop_process(process)
                if not _port_in_use(log):
                    raise
        else:
            raise ServerStartError(f"moto_server: no free port after 3 tries:\n{_log_tail(log)}")
        yield S3Server(endpoint_url=url, pid=process.pid, startup_seconds=time.monotonic() - started)
    finally:
        if process is not None:
            stop_process(process)
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------------------------ PostgreSQL


@dataclasses.dataclass(frozen=True)
class PostgresServer:
    """A throwaway PostgreSQL cluster with database `database` (pg_trgm installed) owned by `user`."""

    host: str
    port: int
    user: str
    password: str
    database: str
    data_dir: Path
    socket_dir: Path
    bindir: Path
    startup_seconds: float = 0.0

    @property
    def url(self) -> str:
        """SQLAlchemy URL with the asyncpg driver: what PREFECT_SERVER_DATABASE_CONNECTION_URL takes."""
        return f"postgresql+asyncpg://{self.user}:{self.password}@{self.host}:{self.port}/{self.database}"

    @property
    def dsn(self) -> str:
        """libpq / asyncpg.connect() form."""
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{self.database}"

    def psql(self, sql: str, database: str | None = None) -> str:
        """Run SQL with psql over TCP (password auth); returns its unaligned, tuples-only output."""
        env = dict(os.environ, PGPASSWORD=self.password)
        done = subprocess.run(
            [str(self.bindir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", self.host,
             "-p", str(self.port), "-U", self.user, "-d", database or self.database, "-c", sql],
            env=env, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"psql {sql!r} failed: {done.stderr.strip()}")
        return done.stdout.strip()


def postgres_bindir() -> Path | None:
    """The directory with `initdb`, `pg_ctl` and `postgres`: $NEWSGROUPS_LSTM_PG_BINDIR, PATH, or Debian's."""
    candidates: list[Path] = []
    if os.environ.get("NEWSGROUPS_LSTM_PG_BINDIR"):
        candidates.append(Path(os.environ["NEWSGROUPS_LSTM_PG_BINDIR"]))
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.name)) or (0,)

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    candidates += [Path("/usr/local/pgsql/bin"), Path("/usr/pgsql/bin")]
    for path in candidates:
        if all((path / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres", "psql")):
            return path
    return None


def _postgres_account() -> pwd.struct_passwd | None:
    """The account the server runs as: ourselves, or (as root, which postgres refuses) `postgres` / `nobody`."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid())
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    return None


def postgres_unavailable() -> str | None:
    """Why a PostgreSQL server cannot run here, or None."""
    if postgres_bindir() is None:
        return ("PostgreSQL server binaries not found (initdb, pg_ctl, postgres; looked in $NEWSGROUPS_LSTM_PG_BINDIR, "
                "PATH, /usr/lib/postgresql/*/bin): install Debian's `postgresql` package (.ci/run does)")
    if _postgres_account() is None:
        return "running as root and there is no `postgres` or `nobody` account to run PostgreSQL as"
    return None


@contextlib.contextmanager
def postgres_server(database: str = "prefect", user: str = "prefect", extensions: tuple[str, ...] = ("pg_trgm",),
                    durable: bool = False, timeout: float = 120.0,
                    base_dir: str | os.PathLike | None = None) -> Iterator[PostgresServer]:
    """initdb a fresh cluster in a temp dir, start it on a free loopback port, create `database` + extensions.

    As root the server runs as the `postgres` (else `nobody`) account, which owns the temp dir; `base_dir`
    (default: the system temp dir) must therefore be traversable by that account. With `durable=False`
    (tests) fsync and full-page writes are off: a crash may lose the cluster, which is deleted anyway.
    """
    reason = postgres_unavailable()
    if reason:
        raise ServerUnavailable(reason)
    bindir = postgres_bindir()
    account = _postgres_account()
    assert bindir is not None and account is not None
    as_other = account.pw_uid != os.geteuid()
    root = Path(tempfile.mkdtemp(prefix="nglstm-pg-", dir=base_dir))
    data, sockets, log, pwfile = root / "data", root / "sock", root / "postgres.log", root / "pwfile"
    password = secrets.token_hex(16)
    started_cluster = False

    def run_as(args: list[str], **kwargs) -> subprocess.CompletedProcess:
        if as_other:
            kwargs.update(user=account.pw_uid, group=account.pw_gid, extra_groups=[])
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(HOME=str(root), LC_ALL="C", LANG="C")
        return subprocess.run(args, cwd=root, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, **kwargs)

    try:
        started = time.monotonic()
        sockets.mkdir()
        pwfile.write_text(password + "\n")
        for path in (root, sockets, pwfile):
            if as_other:
                os.chown(path, account.pw_uid, account.pw_gid)
            path.chmod(0o600 if path == pwfile else 0o700)
        done = run_as([str(bindir / "initdb"), "-D", str(data), "-U", user, f"--pwfile={pwfile}", "-E", "UTF8",
                       "--locale=C", "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync",
                       "--no-instructions"])
        if done.returncode != 0:
            raise ServerStartError(f"initdb failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        pwfile.unlink()
        options = ["-c listen_addresses=" + HOST, f"-k {sockets}"]
        if not durable:
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        for _attempt in range(3):
            port = free_port()
            done = run_as([str(bindir / "pg_ctl"), "start", "-D", str(data), "-l", str(log), "-w", "-t", str(int(timeout)),
                           "-o", " ".join([f"-p {port}", *options])])
            if done.returncode == 0:
                started_cluster = True
                break
            if not _port_in_use(log):
                raise ServerStartError(f"pg_ctl start failed:\n{done.stdout[-1000:]}{done.stderr[-1000:]}\n"
                                       f"{_log_tail(log)}")
        else:
            raise ServerStartError(f"PostgreSQL: no free port after 3 tries:\n{_log_tail(log)}")
        server = PostgresServer(host=HOST, port=port, user=user, password=password, database=database,
                                data_dir=data, socket_dir=sockets, bindir=bindir)
        server.psql(f'CREATE DATABASE "{database}"', database="postgres")
        for extension in extensions:
            server.psql(f'CREATE EXTENSION IF NOT EXISTS "{extension}"')
        server = dataclasses.replace(server, startup_seconds=time.monotonic() - started)
        yield server
    finally:
        if started_cluster:
            done = run_as([str(bindir / "pg_ctl"), "stop", "-D", str(data), "-m", "fast", "-w", "-t", "30"])
            if done.returncode != 0:
                _kill_postmaster(data)
        shutil.rmtree(root, ignore_errors=True)


def _kill_postmaster(data: Path) -> None:
    """Last resort when `pg_ctl stop` failed: SIGQUIT (immediate shutdown) the pid in postmaster.pid."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int((data / "postmaster.pid").read_text().splitlines()[0])
        os.kill(pid, signal.SIGQUIT)
        for _ in range(50):
            os.kill(pid, 0)
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------------------------------- Prefect


@dataclasses.dataclass(frozen=True)
class PrefectServer:
    """A `prefect server start` process with its own PREFECT_HOME."""

    api_url: str
    ui_url: str
    home: Path
    pid: int
    log: Path
    database_url: str | None = None
    startup_seconds: float = 0.0
    env: dict[str, str] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def client_env(self) -> dict[str, str]:
        """Environment entries for a process (worker, CLI, flow) that talks to this server."""
        return {"PREFECT_API_URL": self.api_url}


def prefect_unavailable() -> str | None:
    if venv_script("prefect") is None and importlib.util.find_spec("prefect") is None:
        return "prefect is not installed"
    return None


@contextlib.contextmanager
def prefect_server(database_url: str | None = None, ui: bool = True, services: bool = True,
                   extra_env: dict[str, str] | None = None, timeout: float = 300.0,
                   base_dir: str | os.PathLike | None = None) -> Iterator[PrefectServer]:
    """`prefect server start` on a free loopback port, SQLite in its PREFECT_HOME unless `database_url`
    (e.g. `PostgresServer.url`) is given. Inherited PREFECT_* settings are dropped so the server's own
    home, database and API URL are the only ones it sees; `extra_env` adds settings."""
    reason = prefect_unavailable()
    if reason:
        raise ServerUnavailable(reason)
    root = Path(tempfile.mkdtemp(prefix="nglstm-prefect-", dir=base_dir))
    log = root / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(root / "home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="true" if ui else "false",
        PREFECT_LOGGING_LEVEL="WARNING",
        PREFECT_SERVER_LOGGING_LEVEL="WARNING",
    )
    if database_url:
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database_url
    env.update(extra_env or {})
    script = venv_script("prefect")
    command = [script] if script else [sys.executable, "-m", "prefect"]
    command += ["server", "start", "--host", HOST]
    if not services:
        command.append("--no-services")
    process = None
    try:
        for _attempt in range(3):
            port = free_port()
            api_url, ui_url = f"http://{HOST}:{port}/api", f"http://{HOST}:{port}"
            # The UI asks /ui-settings where the API is; that defaults to port 4200, whatever --port says.
            env.update(PREFECT_SERVER_API_HOST=HOST, PREFECT_SERVER_API_PORT=str(port),
                       PREFECT_SERVER_UI_API_URL=api_url)
            started = time.monotonic()
            with open(log, "wb") as out:
                process = subprocess.Popen([*command, "--port", str(port)], env=env, cwd=root, stdout=out,
                                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                _wait_until(lambda api_url=api_url: _http_get(api_url + "/health") == (200, b"true"),
                            "prefect server", timeout, process, log, interval=0.25)
                break
            except ServerStartError:
                stop_process(process)
                if not _port_in_use(log):
                    raise
        else:
            raise ServerStartError(f"prefect server: no free port after 3 tries:\n{_log_tail(log)}")
        yield PrefectServer(api_url=api_url, ui_url=ui_url, home=root / "home", pid=process.pid, log=log,
                            database_url=database_url, startup_seconds=time.monotonic() - started, env=env)
    finally:
        if process is not None:
            stop_process(process)
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    """Start PostgreSQL, S3 and a Prefect server on PostgreSQL; print URLs and start-up times; stop them."""
    with contextlib.ExitStack() as stack:
        s3 = stack.enter_context(s3_server())
        print(f"s3         {s3.endpoint_url:45s} {s3.startup_seconds:6.2f} s", flush=True)
        pg = stack.enter_context(postgres_server())
        print(f"postgres   {pg.url.replace(pg.password, '***'):45s} {pg.startup_seconds:6.2f} s", flush=True)
        prefect = stack.enter_context(prefect_server(database_url=pg.url))
        print(f"prefect    {prefect.api_url:45s} {prefect.startup_seconds:6.2f} s", flush=True)
        if "--wait" in sys.argv:
            print("Ctrl-C stops them", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()


if __name__ == "__main__":
    main()
