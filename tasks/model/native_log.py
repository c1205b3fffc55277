"""TensorFlow's C++ start-up log, held to what TF_CPP_MIN_LOG_LEVEL asks for.

TensorFlow 2.21 logs through absl. What it logs before absl::InitializeLog() runs (while
`import tensorflow` loads its libraries: "oneDNN custom operations are on", "Could not find cuda
drivers", and absl's own "WARNING: All log messages before absl::InitializeLog() is called are
written to STDERR") goes straight to file descriptor 2, whatever TF_CPP_MIN_LOG_LEVEL says; after
that, TensorFlow applies the level itself. So the first import runs with fd 2 led into a pipe, and
afterwards every line is written to the real stderr except absl lines below the level (and absl's
notice, for any level above 0). Unset or 0: nothing is captured.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from contextlib import contextmanager

# absl's prefix: severity, MMDD hh:mm:ss.micros (before InitializeLog: 0000 00:00:<unix seconds>), thread, file:line]
ABSL_LINE = re.compile(rb"^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [^\]\s]+:\d+\] ")
ABSL_NOTICE = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
SEVERITY = {b"I": 0, b"W": 1, b"E": 2, b"F": 3}
_lock = threading.Lock()


def min_level() -> int:
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


def keep(line: bytes, level: int) -> bool:
    """Whether a line of native stderr output is shown at TF_CPP_MIN_LOG_LEVEL `level`."""
    if level <= 0:
        return True
    if line.startswith(ABSL_NOTICE):
        return False
    match = ABSL_LINE.match(line)
    return match is None or SEVERITY[match.group(1)] >= level


@contextmanager
def native_stderr_filtered(level: int | None = None):
    """Run the block with fd 2 captured; then write the lines `keep` allows to the real stderr.

    Process-wide (fd 2 is): another thread's stderr output during the block is delayed, not lost.
    """
    level = min_level() if level is None else level
    if level <= 0:
        yield
        return
    with _lock:
        sys.stderr.flush()
        saved = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
        captured: list[bytes] = []
        reader = threading.Thread(target=_drain, args=(read_end, captured), name="native-stderr", daemon=True)
        reader.start()
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)  # closes the pipe's last write end: the reader sees the end
            os.close(saved)
            reader.join(timeout=5)
            lines = b"".join(captured).splitlines(keepends=True)
            shown = memoryview(b"".join(line for line in lines if keep(line, level)))
            while shown:
                shown = shown[os.write(2, shown):]


def _drain(fd: int, into: list[bytes]) -> None:
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        while chunk := pipe.read(65536):
            into.append(chunk)
