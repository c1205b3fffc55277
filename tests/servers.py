"""Servers for the tests: the real S3 / PostgreSQL / Prefect servers of deployments/servers.py (one
implementation, shared with deployments/cluster.py), plus the system Chromium that Playwright drives.

tests/conftest.py wraps them in session fixtures (`s3_server`, `postgres_server`, `prefect_server`, `chromium`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil

from deployments.servers import (  # noqa: F401 - re-exported for tests/conftest.py and the tests
    HOST,
    PostgresServer,
    PrefectServer,
    S3Server,
    ServerStartError,
    ServerUnavailable,
    free_port,
    postgres_server,
    postgres_unavailable,
    prefect_server,
    prefect_unavailable,
    s3_server,
    s3_unavailable,
    stop_process,
)

# Launch flags for Chromium in a container or CI: no sandbox (root), no GPU, no network chatter of its own.
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)
CHROMIUM_CANDIDATES = (
    "/usr/bin/chromium",
    "/usr/bin/chromium-browser",
    "/usr/lib/chromium/chromium",
    "/usr/bin/google-chrome",
)


def chromium_executable() -> str | None:
    """Path of a Chromium/Chrome binary: $NEWSGROUPS_LSTM_CHROMIUM, Debian's /usr/bin/chromium, or PATH."""
    configured = os.environ.get("NEWSGROUPS_LSTM_CHROMIUM")
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    for path in CHROMIUM_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def chromium_unavailable() -> str | None:
    """Why a headless Chromium driven by Playwright cannot run here, or None."""
    if chromium_executable() is None:
        return ("no Chromium binary ($NEWSGROUPS_LSTM_CHROMIUM, /usr/bin/chromium, PATH): "
                "install Debian's `chromium` package (.ci/run does)")
    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is not installed: pip install -e '.[dev]'"
    return None


@contextlib.contextmanager
def chromium_browser(executable: str | None = None):
    """A Playwright (sync API) Browser on the system Chromium; never downloads a browser."""
    executable = executable or chromium_executable()
    reason = None if executable else chromium_unavailable()
    if reason:
        raise ServerUnavailable(reason)
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=list(CHROMIUM_ARGS))
        try:
            yield browser
        finally:
            browser.close()
