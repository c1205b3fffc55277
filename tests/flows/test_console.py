"""What a person sees on stderr: progress events as bars on a terminal, as periodic lines otherwise; no
TensorFlow start-up noise; every config field described for the deployment's run form."""

from __future__ import annotations

import io
import logging
import re
import threading

import pytest
from rich.console import Console

from flows.console import Bars, progress_output
from tasks.progress import PROGRESS_LOGGER, Reporter, describe

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_two_downloads_get_a_bar_each_and_log_lines_print_above_the_bars():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=150, color_system=None)
    logger = logging.getLogger(PROGRESS_LOGGER)
    handler, level = Bars(console), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        glove, corpus = Reporter("download-glove.6B.zip", "B"), Reporter("download-20news.tar.gz", "B")
        started = threading.Barrier(2)

        def fetch(reporter, total):
            started.wait()
            for done in range(0, total + 1, total // 20):
                reporter.update(done, total)
            if reporter is glove:
                logger.info("glove: a line in the middle of the downloads")

        threads = [threading.Thread(target=fetch, args=(r, n)) for r, n in ((glove, 862_182_613), (corpus, 14_464_277))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        handler._progress.refresh()
        screen = ANSI.sub("", out.getvalue())
        bars = [line for line in screen.splitlines() if "━" in line]
        assert any("download-glove.6B.zip" in line and "862.2 MB" in line for line in bars)
        assert any("download-20news.tar.gz" in line and "14.5 MB" in line for line in bars)
        assert not any("download-glove" in line and "download-20news" in line for line in bars)  # separate rows
        lines = [line for line in screen.splitlines() if "a line in the middle" in line]
        assert lines and all("━" not in line for line in lines)  # printed whole, not inside a bar
        glove.close()
        corpus.close()
        assert handler._rows == {}  # a finished task's bar goes
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.stop()


def test_the_bars_survive_prefect_reconfiguring_logging(tmp_path, monkeypatch):
    """Importing Prefect runs logging.config.dictConfig, which closes every handler that exists: the bars
    (set up before Prefect is imported) must keep drawing on their own copy of the terminal."""
    import functools
    import logging.config

    terminal = open(tmp_path / "terminal", "w")  # noqa: SIM115 - stands for the user's terminal
    monkeypatch.setattr("sys.stderr", terminal)
    monkeypatch.setattr("flows.console.Console", functools.partial(Console, force_terminal=True, width=120))
    with progress_output(terminal=True):
        logging.config.dictConfig({"version": 1, "disable_existing_loggers": False})
        reporter = Reporter("download-x.zip", "B")
        reporter.update(5_000_000, 10_000_000)
        reporter.close()
    terminal.close()
    assert "download-x.zip" in ANSI.sub("", (tmp_path / "terminal").read_text())


def test_without_a_terminal_only_the_periodic_lines_are_printed(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    clock = iter(range(0, 1000, 4))  # 4 s between updates: every 10 s is every third update
    monkeypatch.setattr("tasks.progress.time.monotonic", lambda: float(next(clock)))
    with progress_output(terminal=False):
        reporter = Reporter("train", "batches", every=10.0)
        for batch in range(1, 11):
            reporter.update(batch, 10, phase="epoch 1/3", overall=batch / 30, loss=1.0 / batch)
        reporter.close()
        logging.getLogger(PROGRESS_LOGGER).info("train: Completed in 40.0 s")
    lines = err.getvalue().splitlines()
    assert len(lines) == 4, lines  # updates at 12, 24 and 36 s, then the plain record
    assert lines[0].endswith("train epoch 1/3: 3 of 10 batches (30%), loss 0.3333, 19 s left")  # 3 batches in 8 s
    assert lines[-1].endswith("train: Completed in 40.0 s")


def test_describe_reads_like_a_sentence():
    event = {"task": "download-glove.6B.zip", "done": 431_000_000, "total": 862_000_000, "unit": "B",
             "rate": 35_200_000, "seconds_left": 12.2}
    assert describe(event) == "download-glove.6B.zip: 431.0 of 862.0 MB (50%), 35.2 MB/s, 12 s left"
    assert describe({"task": "download-x", "done": 2_000_000, "total": None, "unit": "B"}) == "download-x: 2.0 MB"


def test_training_reports_each_batch_through_the_progress_logger(tmp_path):
    """tasks/model calls a plain callable after every batch; tasks/train turns it into progress events."""
    from tasks.train import train
    from tests.tasks._training_data import publish_inputs, tiny_config

    events = []

    class Collect(logging.Handler):
        def emit(self, record):
            if getattr(record, "progress", None):
                events.append(record.progress)

    logger = logging.getLogger(PROGRESS_LOGGER)
    collect, level = Collect(), logger.level
    logger.addHandler(collect)
    logger.setLevel(logging.INFO)
    try:
        tokens, embeddings, _ = publish_inputs(str(tmp_path))
        train.fn(tiny_config(epochs=2, refit=False), tokens, embeddings, data_home=str(tmp_path))  # one training's batches
    finally:
        logger.removeHandler(collect)
        logger.setLevel(level)
    batches = [e for e in events if not e["final"]]
    total = batches[0]["total"]
    assert [(e["phase"], e["done"]) for e in batches] == [(f"epoch {epoch}/2", b) for epoch in (1, 2)
                                                          for b in range(1, total + 1)]
    assert all(e["task"] == "train" and e["unit"] == "batches" and isinstance(e["fields"]["loss"], float) for e in batches)
    assert events[-1]["final"] is True


# -- TensorFlow's C++ start-up log -----------------------------------------------------------------------------
TF_START_UP = [  # what `import tensorflow` (2.21) writes to fd 2 before absl::InitializeLog
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
    b"I0000 00:00:1795766583.513159   16017 port.cc:153] oneDNN custom operations are on. You may see slightly\n",
    b"I0000 00:00:1795766583.517421   16017 cudart_stub.cc:31] Could not find cuda drivers on your machine\n",
    b"E0000 00:00:1795766589.602165   16017 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error\n",
]


@pytest.mark.parametrize("level, kept", [(0, TF_START_UP), (1, TF_START_UP[3:]), (3, [])])
def test_native_log_lines_obey_tf_cpp_min_log_level(level, kept):
    from tasks.model.native_log import keep

    other = b"Traceback (most recent call last):\n"
    assert [line for line in [*TF_START_UP, other] if keep(line, level)] == [*kept, other]


def test_native_stderr_is_filtered_and_the_rest_is_written_after(capfd):
    import os

    from tasks.model.native_log import native_stderr_filtered

    with native_stderr_filtered(level=2):
        for line in (*TF_START_UP, b"a message of another library\n"):
            os.write(2, line)
    err = capfd.readouterr().err
    assert err == TF_START_UP[3].decode() + "a message of another library\n"


# -- the deployment's run form -------------------------------------------------------------------------------
def test_every_config_field_has_a_description_in_the_flow_parameter_schema():
    from prefect.utilities.callables import parameter_schema

    from flows.pipeline import pipeline
    from tasks.config import PipelineConfig

    schema = parameter_schema(pipeline.fn).model_dump_for_openapi()
    definitions = schema["definitions"]

    def description(spec: dict) -> str | None:  # a section's description is its model's (what the UI shows)
        ref = spec.get("$ref") or next((s.get("$ref") for s in spec.get("anyOf", []) if "$ref" in s), None)
        return spec.get("description") or (definitions[ref.rsplit("/", 1)[1]].get("description") if ref else None)

    missing = [f"{name}.{field}" for name, model in definitions.items() for field, spec in model.get("properties", {}).items()
               if not description(spec)]
    assert missing == []
    assert definitions["TrainConfig"]["properties"]["epochs"]["description"].startswith("Most passes over the training")
    assert {"config", "until", "train_deployment"} <= {n for n, p in schema["properties"].items() if p.get("description")}
    assert PipelineConfig().train.epochs == 20  # descriptions, not new defaults
