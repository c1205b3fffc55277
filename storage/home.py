"""Where the data lives: an explicit argument, then $NEWSGROUPS_LSTM_HOME, then ~/.cache/newsgroups-lstm."""

import os
from pathlib import Path

ENV_VAR = "NEWSGROUPS_LSTM_HOME"


def data_home(explicit: str | os.PathLike | None = None) -> str:
    """Return the data home as a string: an absolute local path or an object-store URI (s3://, gs://)."""
    value = explicit or os.environ.get(ENV_VAR) or "~/.cache/newsgroups-lstm"
    value = str(value)
    if value.startswith("file://"):
        value = value[len("file://"):]
    elif is_uri(value):
        return value.rstrip("/")
    return str(Path(value).expanduser().resolve())


def is_uri(value: str) -> bool:
    return "://" in value and not value.startswith("file://")
