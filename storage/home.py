"""Where the data lives, and the one local cache of an object-store data home.

The data home: an explicit argument, then $NEWSGROUPS_LSTM_HOME, then ~/.cache/newsgroups-lstm.
The object cache (verified local copies of object-store files, build staging, locks):
$NEWSGROUPS_LSTM_CACHE_DIR (default ~/.cache/newsgroups-lstm-objects), capped at
$NEWSGROUPS_LSTM_CACHE_BYTES (default 4G; suffixes K, M, G, T), cleaned least-recently-used.
"""

import os
import re
from pathlib import Path

from storage.errors import UsageError

ENV_VAR = "NEWSGROUPS_LSTM_HOME"
MANIFEST = "manifest.json"  # <home>/<step>/<key>/manifest.json: what makes an artifact count
CACHE_DIR_VAR = "NEWSGROUPS_LSTM_CACHE_DIR"
CACHE_BYTES_VAR = "NEWSGROUPS_LSTM_CACHE_BYTES"
DEFAULT_CACHE_BYTES = 4 * 1024**3
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


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


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_VAR) or "~/.cache/newsgroups-lstm-objects").expanduser().resolve()


def cache_bytes() -> int:
    """The object cache's size cap, from $NEWSGROUPS_LSTM_CACHE_BYTES (e.g. 500M, 4G, 1073741824)."""
    value = os.environ.get(CACHE_BYTES_VAR, "").strip()
    if not value:
        return DEFAULT_CACHE_BYTES
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?", value, re.IGNORECASE)
    if not match:
        raise UsageError(f"{CACHE_BYTES_VAR}={value!r}: expected a size such as 500M, 4G or 1073741824")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])
