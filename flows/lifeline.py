"""`python -m flows.lifeline PID`: stops what the CLI started once the CLI is gone, even after kill -9.

Prefect starts its temporary API server as a plain subprocess of the CLI (SubprocessASGIServer,
no parent-death signal, its stop() only runs at a normal exit), so a killed CLI used to leave it
running. This watchdog, started by the CLI in a session of its own (a Ctrl-C in the terminal
does not reach it), notes the CLI's descendants every POLL_S. When the CLI has exited (this
process is re-parented), it terminates the noted processes that are still the same processes
(psutil compares pid and start time, so a reused pid is never hit), kills those left after
GRACE_S, and exits. After a normal exit the CLI has stopped them already: nothing is left to do.
"""

from __future__ import annotations

import os
import sys
import time

import psutil

POLL_S = 0.2
GRACE_S = 3.0


def watch(pid: int) -> list[int]:
    """Watch the process `pid` (this process's parent) until it exits; return the pids stopped after it."""
    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return []
    known: set[psutil.Process] = set()
    while os.getppid() == pid:  # the CLI is alive: a dead parent re-parents us at once, even as a zombie
        try:
            known = {p for p in known if p.is_running()} | {p for p in parent.children(recursive=True)
                                                           if p.pid != os.getpid()}
        except psutil.NoSuchProcess:
            break
        time.sleep(POLL_S)
    left = [p for p in known if p.is_running()]
    for process in left:
        _signal(process.terminate)
    _gone, alive = psutil.wait_procs(left, timeout=GRACE_S)
    for process in alive:
        _signal(process.kill)
    return [p.pid for p in left]


def _signal(send) -> None:
    try:
        send()
    except psutil.Error:  # already gone, or not ours to signal
        pass


if __name__ == "__main__":
    watch(int(sys.argv[1]))
