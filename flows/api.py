"""Which Prefect API a CLI command reports to: PREFECT_API_URL, the reused local server, or Prefect's temporary one."""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from storage.errors import UsageError
from tasks.progress import PROGRESS_LOGGER

IDLE_ENV = "NEWSGROUPS_LSTM_SERVER_IDLE_MINUTES"
DEFAULT_IDLE_MINUTES = 15.0


@dataclass
class Api:
    kind: str  # "configured" (PREFECT_API_URL), "local" (the background server) or "temporary" (Prefect's own)
    url: str | None = None


def idle_seconds() -> float:
    raw = os.environ.get(IDLE_ENV, str(DEFAULT_IDLE_MINUTES))
    try:
        return float(raw) * 60
    except ValueError:
        raise UsageError(f"{IDLE_ENV}={raw!r}: expected a number of minutes (0: no background server)") from None


def prefect_home() -> Path:
    """PREFECT_HOME as Prefect reads it, without importing Prefect (only the environment can set it)."""
    return Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()


def start_local_api_early() -> bool:
    """Start the local server (if it is not running) before this process imports Prefect, so both start at once.
    Whether it was started: the profile may turn out to name an API (prefect_api then stops it)."""
    if os.environ.get("PREFECT_API_URL") or idle_seconds() <= 0:
        return False
    if "prefect.settings" in sys.modules:  # already loaded (main() called in-process): asking it costs nothing
        from prefect.settings import PREFECT_API_URL

        if PREFECT_API_URL.value():
            return False
    from storage.prefect_api import start

    return start(prefect_home(), idle_seconds())[1]


@contextmanager
def prefect_api(started_early: bool = False):
    """The API the flow reports to: PREFECT_API_URL if set (environment or profile), else the local background
    server (storage.prefect_api, reused between commands), else with NEWSGROUPS_LSTM_SERVER_IDLE_MINUTES=0
    Prefect's temporary one (started and stopped by this process)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from storage import prefect_api as local

    if PREFECT_API_URL.value():
        if started_early:
            local.stop(prefect_home())
        yield Api("configured", PREFECT_API_URL.value())
        return
    if idle_seconds() <= 0:
        yield Api("temporary")
        return
    home = prefect_home()
    if not (home / "prefect.db").exists():
        logging.getLogger(PROGRESS_LOGGER).info("starting a local Prefect server (the first start creates its "
                                                "database in %s; later commands reuse the server)", home)
    url = local.local_api(home, idle_seconds())
    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield Api("local", url)
