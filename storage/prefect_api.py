"""A local Prefect API that outlives one command, so that a cached rerun takes seconds.

Without PREFECT_API_URL, Prefect starts a temporary API server for every process that runs a
flow and stops it when the process exits: about 7 s of every `newsgroups-lstm run` on 2 cores,
and its runs can only be looked at after starting a server by hand. Instead, the first command
starts this module as a background server (`prefect server start`'s app: API, UI and services,
on 127.0.0.1, the same database in PREFECT_HOME), and later commands reuse it while it answers
/api/health. It stops itself after `idle_seconds` without a request or open connection (a
running flow keeps a websocket open; a browser on the UI polls), so nothing is left behind
for long.

    <PREFECT_HOME>/newsgroups-lstm-api.json    {"pid", "url", "port", ...} of the running server; {"port"} once stopped
    <PREFECT_HOME>/newsgroups-lstm-api.log     its output
    <PREFECT_HOME>/newsgroups-lstm-api.lock    held while a command checks or starts it, and while it stops

    python -m storage.prefect_api --port 4300 --idle-seconds 900 --home ~/.prefect    # what local_api() starts
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from filelock import FileLock, Timeout

from storage.errors import PipelineError

HOST = "127.0.0.1"
STATE, LOG, LOCK = "newsgroups-lstm-api.json", "newsgroups-lstm-api.log", "newsgroups-lstm-api.lock"
MODULE = "storage.prefect_api"


def healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def _raw_state(home: Path) -> dict:
    try:
        state = json.loads((home / STATE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def read_state(home: Path) -> dict | None:
    """The server last started for `home` ({"pid", "url", "port", "started", "starting"}); None once it stopped."""
    state = _raw_state(home)
    return state if {"pid", "url"} <= state.keys() else None


def _mark_stopped(home: Path, pid: int) -> None:
    """Forget the server `pid` (if it is the one recorded), keeping its port: the next one gets the same UI address."""
    state = read_state(home)
    if state and int(state["pid"]) == pid:
        (home / STATE).write_text(json.dumps({"port": state.get("port")}))


def running(home: Path) -> dict | None:
    """The state of this PREFECT_HOME's background server if it answers, else None."""
    state = read_state(home)
    return state if state and healthy(state["url"]) else None


def start(home: Path, idle_seconds: float) -> tuple[dict, bool]:
    """(state, whether this call started it): the server of `home` that answers or is starting, else a new one.

    Does not wait for it to answer (local_api does): a command starts it first thing and imports Prefect meanwhile.
    """
    home.mkdir(parents=True, exist_ok=True)
    with FileLock(str(home / LOCK), timeout=60):
        state = read_state(home)
        if state and (healthy(state["url"], timeout=1.0) or (state.get("starting") and _is_ours(int(state["pid"])))):
            return state, False
        last = _raw_state(home).get("port")
        ports = [last] if isinstance(last, int) else []  # the same UI address as last time, if free
        port = next(p for p in [*ports, _free_port()] if _port_free(p))
        state = {"pid": _spawn(home, port, idle_seconds), "url": f"http://{HOST}:{port}/api", "port": port,
                 "started": time.time(), "starting": True}
        (home / STATE).write_text(json.dumps(state))
        return state, True


def local_api(home: Path, idle_seconds: float, timeout: float = 180.0) -> str:
    """The API URL of the server of `home`, started if none answers, once it answers.

    A first start on a fresh PREFECT_HOME creates the database (up to a minute on a slow disk).
    """
    deadline = time.monotonic() + timeout
    for _attempt in range(3):
        state, _ = start(home, idle_seconds)
        while time.monotonic() < deadline and _is_ours(int(state["pid"])):
            if healthy(state["url"], timeout=1.0):
                return state["url"]
            time.sleep(0.1)
        if time.monotonic() >= deadline:
            break
        # it exited while starting (e.g. another process took its port): start another
    raise PipelineError(f"the local Prefect server did not answer within {timeout:.0f} s; its log {home / LOG} ends "
                        f"with:\n{_log_tail(home)}")


def stop(home: Path, timeout: float = 30.0) -> dict | None:
    """Stop this PREFECT_HOME's background server; its state, or None if none was running."""
    with FileLock(str(home / LOCK), timeout=timeout):
        state = read_state(home)
        if not state:
            return None
        pid = int(state["pid"])
        if _is_ours(pid):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _is_ours(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
        _mark_stopped(home, pid)
        return state


# Starts argv[2:] in a session of its own, output to the file argv[1], prints its pid and exits: the server is then
# no descendant of the command (which stops its descendants when interrupted) and no zombie of it.
_LAUNCHER = ("import subprocess, sys; log = open(sys.argv[1], 'wb'); print(subprocess.Popen(sys.argv[2:], "
             "stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True).pid)")


def _spawn(home: Path, port: int, idle_seconds: float) -> int:
    """Start the server for `home` on `port`, detached from this process; its pid."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    url = f"http://{HOST}:{port}/api"
    env.update(PREFECT_SERVER_API_HOST=HOST, PREFECT_SERVER_API_PORT=str(port), PREFECT_SERVER_UI_API_URL=url,
               PREFECT_SERVER_LOGGING_LEVEL=env.get("PREFECT_SERVER_LOGGING_LEVEL", "WARNING"))
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    server = [sys.executable, "-m", MODULE, "--port", str(port), "--idle-seconds", str(idle_seconds), "--home", str(home)]
    done = subprocess.run([sys.executable, "-c", _LAUNCHER, str(home / LOG), *server], env=env, cwd=home,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    if done.returncode != 0 or not done.stdout.strip().isdigit():
        raise PipelineError(f"could not start the local Prefect server: {done.stderr.strip()[-500:] or done.stdout}")
    return int(done.stdout)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def _is_ours(pid: int) -> bool:
    """The process is alive and is this module's server (a recycled pid is left alone)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return sys.platform != "linux"
    return MODULE.encode() in cmdline


def _log_tail(home: Path, chars: int = 3000) -> str:
    try:
        return (home / LOG).read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


# -- the server process ------------------------------------------------------------------------------------
class Activity:
    """ASGI middleware: when the last request or connection ended (0 idle while any is open)."""

    def __init__(self, app):
        self.app, self.open, self.last = app, 0, time.monotonic()

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        self.open += 1
        self.last = time.monotonic()
        try:
            return await self.app(scope, receive, send)
        finally:
            self.open -= 1
            self.last = time.monotonic()

    def idle_seconds(self) -> float:
        return 0.0 if self.open else time.monotonic() - self.last


def serve(port: int, idle_seconds: float, home: Path) -> None:
    """Prefect's server app (as `prefect server start`) on 127.0.0.1:port, until idle for idle_seconds or SIGTERM."""
    import uvicorn
    from prefect.server.api.server import create_app

    activity = Activity(create_app(final=True))
    server = uvicorn.Server(uvicorn.Config(activity, host=HOST, port=port, log_level="warning", lifespan="on"))

    def stop_when_idle() -> None:
        while not server.should_exit:
            time.sleep(min(10.0, max(idle_seconds / 4, 0.2)))
            if activity.idle_seconds() < idle_seconds:
                continue
            try:  # under the lock, so that no command picks this server while it stops
                with FileLock(str(home / LOCK), timeout=0):
                    if activity.idle_seconds() >= idle_seconds:
                        _mark_stopped(home, os.getpid())
                        server.should_exit = True
            except Timeout:
                continue  # a command is checking this server right now: it is not idle

    threading.Thread(target=stop_when_idle, name="idle-stop", daemon=True).start()
    server.run()
    _mark_stopped(home, os.getpid())


def main() -> None:
    parser = argparse.ArgumentParser(description="The background Prefect server of newsgroups-lstm (see module doc).")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--idle-seconds", type=float, default=900.0)
    parser.add_argument("--home", type=Path, required=True, help="the PREFECT_HOME whose state file names this server")
    args = parser.parse_args()
    serve(args.port, args.idle_seconds, args.home)


if __name__ == "__main__":
    main()
