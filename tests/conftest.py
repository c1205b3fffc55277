"""Test isolation: a private Prefect home and data home per session, never the user's."""

import os
import tempfile

_SESSION_DIR = tempfile.mkdtemp(prefix="newsgroups-lstm-tests-")
os.environ["PREFECT_HOME"] = os.path.join(_SESSION_DIR, "prefect")
os.environ["NEWSGROUPS_LSTM_HOME"] = os.path.join(_SESSION_DIR, "data-home-unused")
os.environ["NEWSGROUPS_LSTM_CACHE_DIR"] = os.path.join(_SESSION_DIR, "object-cache")  # never the user's cache
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def prefect_api():
    """A Prefect API server (SQLite in a temp dir) for flow-level tests; started once per session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture
def home(tmp_path):
    """A fresh data home (artifact store root) for one test."""
    path = tmp_path / "home"
    path.mkdir()
    return str(path)


# Real servers on 127.0.0.1 (tests/servers.py): started on first use, stopped (data deleted) at session end.
# A missing server package makes the tests that need it skip, with the reason.


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server: .endpoint_url, .env (AWS_ENDPOINT_URL, keys, region us-east-1), .create_bucket(), .client()."""
    from tests import servers

    reason = servers.s3_unavailable()
    if reason:
        pytest.skip(reason)
    with servers.s3_server() as server:
        yield server


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    """A fresh PostgreSQL cluster with database `prefect` (+ pg_trgm): .url is the postgresql+asyncpg:// URL."""
    from tests import servers

    reason = servers.postgres_unavailable()
    if reason:
        pytest.skip(reason)
    with servers.postgres_server() as server:
        yield server


@pytest.fixture(scope="session")
def prefect_server(postgres_server):
    """`prefect server start` on the PostgreSQL fixture, UI on: .api_url, .ui_url, .client_env."""
    from tests import servers

    with servers.prefect_server(database_url=postgres_server.url) as server:
        yield server


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of the system Chromium for Playwright (executable_path=...); skips when it or playwright is missing."""
    from tests import servers

    reason = servers.chromium_unavailable()
    if reason:
        pytest.skip(reason)
    return servers.chromium_executable()
