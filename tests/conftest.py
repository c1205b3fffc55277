"""Test isolation: a private Prefect home and data home per session, never the user's."""

import os
import tempfile

_SESSION_DIR = tempfile.mkdtemp(prefix="newsgroups-lstm-tests-")
os.environ["PREFECT_HOME"] = os.path.join(_SESSION_DIR, "prefect")
os.environ["NEWSGROUPS_LSTM_HOME"] = os.path.join(_SESSION_DIR, "data-home-unused")
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
