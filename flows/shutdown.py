"""Prompt, clean shutdown of the CLI on SIGINT/SIGTERM, and no stray processes after it.

- The pipeline runs in a worker thread; the main thread only waits for it and handles signals.
  (Prefect's flow engine swaps in its own SIGTERM handler when a flow runs in the main thread,
  and a download sleeping in a task thread would hold the shutdown up.)
- A first signal asks everything to stop (storage.download.request_stop(): downloads wake from
  retry sleeps, archive reading and training check it between members and batches) and the
  flow fails with an `Interrupted` error. Partial downloads and finished training epochs are
  kept; an artifact is published whole or not at all (the store renames a complete directory).
- Once the flow has unwound (well under a second), the CLI prints one line, sends Prefect its last
  logs, stops its children - the temporary Prefect API server that Prefect starts when
  PREFECT_API_URL is unset - and leaves with os._exit (the interpreter's own teardown, TensorFlow's
  included, takes seconds). A server the user runs (PREFECT_API_URL set) is not a child: left alone.
- Whatever the process is doing, it exits GRACE_S after the signal at the latest; a second
  signal exits at once. The exit code is 128 + signal (130 SIGINT, 143 SIGTERM).
- kill -9 cannot be caught: flows.lifeline, a small watchdog process, stops the children then.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil  # imported now: the deadline thread may run during interpreter shutdown, when importing is unsafe

GRACE_S = 2.5  # + CHILD_STOP_S: well within the 5 s a user or a service manager waits
CHILD_STOP_S = 1.0
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(BaseException):
    """Raised in the main thread by a signal when no pipeline thread is running (e.g. during predict)."""


class Shutdown:
    """Signal handling for one CLI command: install(), then run(fn) for the pipeline."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._signalled = threading.Event()
        self._exit_lock = threading.Lock()
        self._waiting = False  # the main thread is only waiting for the pipeline thread
        self._lifeline: subprocess.Popen | None = None
        self._previous: dict[int, Any] = {}
        self._closed = False
        self._request_stop: Callable[[], None] = lambda: None

    # -- set-up ---------------------------------------------------------------------------------
    def install(self) -> Shutdown:
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread (e.g. main() called by a test thread)
        from storage.download import request_stop

        self._request_stop = request_stop  # imported now: a signal handler must not import
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        threading.Thread(target=self._deadline, name="shutdown-deadline", daemon=True).start()
        return self

    def uninstall(self) -> None:
        """Restore the previous handlers (for main() called in-process, e.g. by tests)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if not self.stopping:  # after a signal the deadline stays armed: the process is on its way out
            self._closed = True
            self._signalled.set()  # ends the deadline thread

    def start_lifeline(self) -> None:
        """The watchdog that stops our children if this process is killed with SIGKILL."""
        self._lifeline = subprocess.Popen(
            [sys.executable, "-m", "flows.lifeline", str(os.getpid())], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [_repo_root(), os.environ.get("PYTHONPATH")]))},
        )

    # -- running --------------------------------------------------------------------------------
    def run(self, fn: Callable[[], Any]) -> Any:
        """fn() in a worker thread; its result, or its exception re-raised here."""
        outcome: dict[str, Any] = {}

        def target() -> None:
            try:
                outcome["result"] = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread as is
                outcome["error"] = exc

        worker = threading.Thread(target=target, name="pipeline", daemon=True)
        self._waiting = True
        worker.start()
        try:
            while worker.is_alive():
                worker.join(0.2)  # short joins: a signal handler runs between them
        finally:
            self._waiting = False
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("result")

    @property
    def stopping(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGTERM)

    def message(self, detail: str = "") -> str:
        name = signal.Signals(self.signum or signal.SIGTERM).name
        return f"newsgroups-lstm: stopped by {name}: " + (detail or "nothing half-done was published; the next run "
                                                             "resumes partial downloads and finished training epochs")

    def finish(self, detail: str = "", drain: bool = True) -> int:
        """Print the one line, send Prefect the run's last logs, stop our children (the temporary API
        server: Prefect's own exit handler would wait for its graceful shutdown); the exit code.
        Once only: the deadline may get here first."""
        if self._exit_lock.acquire(blocking=False):
            print(self.message(detail), file=sys.stderr, flush=True)
            if drain:
                _flush_prefect(timeout=0.5)
            stop_children(exclude=self._lifeline.pid if self._lifeline else None)
        return self.exit_code

    def exit_if_signalled(self, code: int) -> None:
        """After a signal: leave now. Everything is written and our children are stopped; the interpreter's
        own teardown (TensorFlow's included) takes seconds, and the deadline cannot run during it."""
        if self._signalled.is_set() and not self._closed:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    # -- signals --------------------------------------------------------------------------------
    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:  # a second signal: no more waiting
            self._exit_now()
        self.signum = signum
        self._request_stop()
        self._signalled.set()
        if not self._waiting:
            raise Stopped(signum)

    def _deadline(self) -> None:
        self._signalled.wait()
        if self._closed:
            return
        time.sleep(GRACE_S)
        self._exit_now()

    def _exit_now(self) -> None:
        code = self.finish(drain=False)  # late already: no waiting for Prefect's logs
        stop_children(exclude=self._lifeline.pid if self._lifeline else None)  # in case finish() is stuck elsewhere
        sys.stdout.flush()
        os._exit(code)


def stop_children(exclude: int | None = None, timeout: float = CHILD_STOP_S) -> list[int]:
    """Terminate this process's descendants (then kill what is left after `timeout`); their pids."""
    children = [p for p in psutil.Process().children(recursive=True) if p.pid != exclude]
    for process in children:
        try:
            process.terminate()
        except psutil.Error:
            pass
    _gone, alive = psutil.wait_procs(children, timeout=timeout)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass
    return [p.pid for p in children]


def _flush_prefect(timeout: float) -> None:
    """Send the logs and events Prefect still holds to its API before that API goes away (else Prefect
    prints "Error logging to API" at exit, or a server the user runs misses the run's last lines)."""
    for module, worker in (("prefect.logging.handlers", "APILogWorker"), ("prefect.events.worker", "EventsWorker")):
        if module in sys.modules:
            try:
                getattr(sys.modules[module], worker).drain_all(timeout=timeout)
            except Exception:  # noqa: BLE001 - best effort: the run's state is already reported
                pass


def _repo_root() -> str:
    """The directory holding the `flows` package (for a lifeline started from a source checkout)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
