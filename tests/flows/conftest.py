"""Tiny generated data for flow tests: a 3-class corpus (tar.gz) and a GloVe-style zip, via file:// URLs."""

from __future__ import annotations

import copy
import hashlib
import io
import os
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DIM = 50
GROUPS = {
    "rec.autos": "car engine wheel brake dealer tire clutch sedan mileage garage".split(),
    "sci.space": "orbit rocket nasa launch moon shuttle satellite planet comet telescope".split(),
    "talk.politics": "senate vote law president congress election policy tax court governor".split(),
}
FILLER = "the a of and to in is it that for on with as was this".split()
DOCS_PER_GROUP = 60


def _corpus_tar(path: Path) -> None:
    rng = np.random.default_rng(7)
    with tarfile.open(path, "w:gz") as tar:
        for group, words in GROUPS.items():
            for i in range(DOCS_PER_GROUP):
                n = int(rng.integers(8, 20))
                text = " ".join(rng.choice(words if rng.random() < 0.6 else FILLER) for _ in range(n))
                data = f"Subject: note {i}\n\n{text}\n".encode()
                info = tarfile.TarInfo(f"tiny-news/{group}/{1000 + i}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _glove_zip(path: Path) -> None:
    rng = np.random.default_rng(11)
    words = [w for ws in GROUPS.values() for w in ws] + FILLER + ["subject", "note"]
    lines = [w + " " + " ".join(f"{x:.4f}" for x in rng.normal(size=DIM)) for w in words]
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"glove.6B.{DIM}d.txt", "\n".join(lines) + "\n")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def tiny_sources(tmp_path_factory) -> dict:
    """{"corpus": {...Source fields}, "glove": {...}} for generated archives, pinned by sha256."""
    root = tmp_path_factory.mktemp("tiny-sources")
    corpus, glove = root / "tiny-news.tar.gz", root / "glove.6B.zip"
    _corpus_tar(corpus)
    _glove_zip(glove)
    return {
        "corpus": {"url": corpus.as_uri(), "sha256": _sha256(corpus), "filename": corpus.name},
        "glove": {"url": glove.as_uri(), "sha256": _sha256(glove), "filename": glove.name},
    }


def tiny_config_dict(tiny_sources: dict, home: str) -> dict:
    """A PipelineConfig (as a dict: also what the CLI reads from a JSON file) that trains in seconds."""
    tiny_sources = copy.deepcopy(tiny_sources)  # callers may edit the result; the fixture is session-wide
    return {
        "data_home": home,
        "sources": {"glove": tiny_sources["glove"], "corpus_source": tiny_sources["corpus"]},
        "corpus": {"test_fraction": 0.25},
        "glove": {"dim": DIM},
        "tokenize": {"num_words": 200, "max_length": 32},
        # one refit model: the flows tests are about orchestration; tests/tasks train two members
        "train": {"epochs": 1, "batch_size": 32, "lstm_units": 8, "lstm_max_tokens": 32, "patience": 0, "refit_members": 1},
    }


@pytest.fixture
def tiny_config(tiny_sources, home):
    from tasks.config import PipelineConfig

    return PipelineConfig.model_validate(tiny_config_dict(tiny_sources, home))


@pytest.fixture
def subprocess_env(prefect_api) -> dict:
    """Environment for a child process that talks to this session's Prefect API."""
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ)
    env["PREFECT_API_URL"] = PREFECT_API_URL.value()
    env["PREFECT_LOGGING_LEVEL"] = "WARNING"
    env["PYTHONPATH"] = str(REPO_ROOT)
    return env
