"""Typed errors. Every message names the file, URL, line or field a user can act on.

`TransientError` marks the only failures worth retrying (network hiccups, 5xx);
everything else is permanent and fails at once.
"""


class PipelineError(Exception):
    """Base class: an error whose message is meant for the user, shown without a traceback."""


class TransientError(PipelineError):
    """A failure that may succeed on retry: timeout, connection reset, HTTP 5xx/429."""


class DownloadError(PipelineError):
    """A permanent download failure: 404/403/410, TLS error, bad redirect, unusable response."""


class ChecksumMismatch(DownloadError):
    def __init__(self, source: str, expected: str, got: str):
        super().__init__(
            f"checksum mismatch for {source}: expected sha256 {expected}, got {got}; "
            "the file was discarded (if the source changed on purpose, set its new sha256)"
        )
        self.source, self.expected, self.got = source, expected, got


class UnsafeArchiveError(PipelineError):
    """An archive member that could escape the target or is not a regular file/directory."""


class InputFormatError(PipelineError):
    """Malformed input data; the message names the file and line or field."""


class SchemaMismatch(PipelineError):
    """A stored artifact does not have the Arrow schema this code expects."""


class DamagedArtifact(PipelineError):
    """A stored file does not match its manifest (size or sha256); the artifact was moved to quarantine."""


class StoreUnavailable(PipelineError):
    """The data home cannot be used: unreachable endpoint, missing bucket, bad credentials, not a directory."""


class TrainingDiverged(PipelineError):
    """Training produced a NaN/inf loss."""


class UsageError(Exception):
    """A bad command line, config file or argument (exit code 2), not a pipeline failure."""


class SourceUnreachable(DownloadError):
    """The host name does not resolve or the connection is refused (offline, or a wrong URL).

    Tried at most twice, quickly, and not transient: neither the downloader nor Prefect's task
    retries wait minutes for a network that is not there.
    """


class NotAnArchive(DownloadError):
    """An unpinned URL served something other than the archive its name promises (e.g. an HTML page)."""


class Interrupted(PipelineError):
    """A stop was requested (SIGTERM/SIGINT, storage.http.request_stop): nothing half-done is published,
    and what is resumable (a partial download, finished training epochs) is kept for the next run."""


class DownloadInterrupted(Interrupted):
    """A stop was requested (SIGTERM/SIGINT); the partial file is kept so the next run resumes it."""


class WriteError(PipelineError):
    """Writing a file failed (disk full, permission denied, read-only file system); the message names the path."""
