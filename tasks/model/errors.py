"""The model package's own errors: plain built-in subclasses, so it needs neither storage nor Prefect.

tasks/train.py re-raises them as the pipeline's typed errors (InputFormatError, TrainingDiverged,
PipelineError); the messages are written for the user either way.
"""


class ModelError(Exception):
    """Base class: a message meant for the user (what is wrong, what to change)."""


class ModelInputError(ModelError, ValueError):
    """The embedding matrix, token ids and labels do not fit together."""


class TrainingDiverged(ModelError, ArithmeticError):
    """Training produced a NaN/inf loss or non-finite predictions."""


class OutOfDeviceMemory(ModelError, MemoryError):
    """The device ran out of memory during training (the message names the batch size to lower)."""


class TrainingInterrupted(ModelError):
    """`should_stop()` asked training to stop (a SIGTERM): raised between two batches; finished epochs stay checkpointed."""
