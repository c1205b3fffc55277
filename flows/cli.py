"""`newsgroups-lstm`: run the pipeline, inspect artifacts, classify text.

Exit codes scripts can rely on: 0 ok, 1 the pipeline (or a prediction) failed, 2 usage or
configuration error. Errors print one line; --debug adds the traceback and Prefect's logs.
The command line maps onto tasks.config.PipelineConfig; it does not repeat it:
`train.epochs=3` sets PipelineConfig.train.epochs.
"""

from __future__ import annotations

import argparse
import contextvars
import itertools
import json
import os
import signal
import sys
import traceback
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from flows import render
from flows.api import DEFAULT_IDLE_MINUTES, IDLE_ENV, idle_seconds, prefect_api, prefect_home, start_local_api_early
from flows.shutdown import Shutdown, Stopped
from flows.stages import STAGES
from storage.errors import UsageError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


# -- commands -----------------------------------------------------------------------------------

def cmd_run(args: argparse.Namespace) -> int:
    from storage.files import read_config_file
    from tasks.config import build_config

    config = build_config([read_config_file(path) for path in args.config], args.overrides, args.preset, args.data_home)
    from storage.artifacts import ArtifactStore

    ArtifactStore(config.data_home).check()  # a bad data home fails in a second, before Prefect starts
    with prefect_api(started_early=start_local_api_early()) as api:
        from flows.pipeline import pipeline

        if api.kind == "temporary":  # Prefect will start a temporary API server, our child: ours to stop
            args.shutdown.start_lifeline()
        context = contextvars.copy_context()  # the pipeline thread sees the API chosen here (a context variable)
        summary = args.shutdown.run(lambda: context.run(pipeline, config, until=args.until,
                                                        train_deployment=args.train_deployment))
    if api.kind == "temporary":  # its UI is gone with it
        summary.get("flow_run", {}).pop("ui_url", None)
    print(json.dumps(summary, indent=2, default=str) if args.json else render.summary(summary))
    return EXIT_OK


def cmd_server(args: argparse.Namespace) -> int:
    from storage import prefect_api as local

    home = prefect_home()
    if args.action == "stop":
        state = local.stop(home)
        print(f"stopped the local Prefect server at {state['url']}" if state else "no local Prefect server running")
        return EXIT_OK
    state = local.running(home)
    if args.action == "start" and state is None:
        local.local_api(home, idle_seconds())
        state = local.running(home)
    if state is None:
        print(f"no local Prefect server running (PREFECT_HOME {home})")
        return EXIT_FAILED if args.action == "status" else EXIT_OK
    print(f"Prefect UI: {state['url'].removesuffix('/api')}   API: {state['url']}   pid {state['pid']}   "
          f"stops after {idle_seconds() / 60:g} idle minutes")
    return EXIT_OK


def _store(args: argparse.Namespace):
    """The data home's store, checked: an unreachable or misconfigured one fails here with one line."""
    from storage.artifacts import ArtifactStore

    store = ArtifactStore(args.data_home)
    store.check()
    return store


def cmd_inspect(args: argparse.Namespace) -> int:
    store = _store(args)
    manifests = store.list()
    if not args.target or any(m["step"] == args.target for m in manifests):
        if args.lineage:
            raise UsageError("--lineage needs an artifact: newsgroups-lstm inspect --lineage train/<key>")
        print(render.artifact_list([m for m in manifests if m["step"] == (args.target or m["step"])], store.root))
        return EXIT_OK
    ref = store.resolve(args.target)
    if args.lineage:
        print(render.lineage(store.lineage(ref.step, ref.key)))
        return EXIT_OK
    manifest = store.read_manifest(ref)
    print(json.dumps(manifest, indent=2))
    names = [n for n in manifest.get("files", {}) if n.endswith(".parquet")]
    if args.target.endswith(".parquet") and Path(args.target).name in names:
        names = [Path(args.target).name]
    for name in names:
        print(render.parquet_preview(name, *store.parquet_head(ref, name, args.rows)))
    return EXIT_OK


def _texts(args: argparse.Namespace) -> Iterator[str]:
    """The texts to classify, in order (arguments, files, stdin), read as they are classified so a long --file or
    stdin never sits in memory whole. Every source is read as bytes and decoded the same way (UTF-8, undecodable
    bytes as U+FFFD: storage.files.decode_text_input), so one input gives one prediction whatever way it came in.
    Arguments and file names are checked first; a blank document stops the stream there with a usage error."""
    from storage.files import decode_text_input, iter_document_lines, read_document

    if missing := [path for path in args.file if not Path(path).is_file()]:
        raise UsageError(f"text file {missing[0]} not found")
    use_stdin = "-" in args.texts or (not args.texts and not args.file and not sys.stdin.isatty())
    arguments = [decode_text_input(os.fsencode(t)) for t in args.texts if t != "-"]
    if blank := [f"argument {i}" for i, text in enumerate(arguments, 1) if not text.strip()]:
        raise UsageError(f"nothing to classify in {', '.join(blank)}: it is empty or only whitespace")
    if not arguments and not args.file and not use_stdin:
        raise UsageError("nothing to classify: give texts as arguments, --file PATH, or pipe them on stdin")
    sources = [(f"file {path}", path) for path in args.file] + ([("stdin", sys.stdin.buffer)] if use_stdin else [])

    def documents() -> Iterator[str]:
        for where, source in sources:
            text = read_document(source) if where != "stdin" else decode_text_input(source.read())
            if not text.strip():
                raise UsageError(f"nothing to classify in {where}: it is empty or only whitespace")
            yield text

    def lines() -> Iterator[str]:
        found = 0
        for _, source in sources:
            for line in iter_document_lines(source):
                if line.strip():
                    found += 1
                    yield line
        if sources and not found and not arguments:
            raise UsageError(f"nothing to classify: {' and '.join(w for w, _ in sources)} holds no non-blank line")

    return itertools.chain(arguments, lines() if args.lines else documents())


def cmd_predict(args: argparse.Namespace) -> int:
    texts = _texts(args)
    texts = itertools.chain([next(texts)], texts)  # the first text read (and checked) before the model loads
    store = _store(args)
    if args.run:
        run = store.resolve(args.run)
    elif latest := store.latest("train"):
        run = store.resolve(f"train/{latest['key']}")
    else:
        raise UsageError(f"no trained run in {store.root}: run `newsgroups-lstm run` first")
    if run.step != "train":
        raise UsageError(f"{run.step}/{run.key} is not a trained run (expected train/<key>)")
    from tasks.predict import iter_predictions

    # tee holds only the texts read ahead of their predictions: one chunk (tasks.predict.PREDICT_CHUNK)
    texts, shown = itertools.tee(texts)
    results = ({"text": text, "label": prediction.label,
                "top": [{"label": k, "probability": float(v)} for k, v in
                        sorted(prediction.probabilities.items(), key=lambda kv: kv[1], reverse=True)[: args.top]]}
               for text, prediction in zip(shown, iter_predictions(store.local_dir(run), texts)))
    # printed as they come: a line each, or one JSON document written piece by piece
    if args.json:
        print(f'{{"run": {json.dumps(f"{run.step}/{run.key}")}, "predictions": [', end="")
        for i, result in enumerate(results):
            print(("," if i else "") + "\n  " + json.dumps(result), end="")
        print("\n]}")
    else:
        for result in results:
            print(render.prediction(result))
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    store = _store(args)
    checked, damaged = store.verify(args.target)
    if args.target and not checked:
        raise UsageError(f"no artifact {args.target!r} in {store.root} (list them with `newsgroups-lstm inspect`)")
    for name, problem, moved_to in damaged:
        print(f"DAMAGED {name}: {problem}; moved to {moved_to}")
    print(f"{len(damaged)} of {checked} artifacts in {store.root} damaged (moved aside; the next run rebuilds them)"
          if damaged else f"{checked} artifacts in {store.root}: every file matches its manifest")
    return EXIT_FAILED if damaged else EXIT_OK


# -- entry point --------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="newsgroups-lstm",
        description="GloVe + 20 Newsgroups -> Parquet -> LSTM text classifier, as a cached Prefect 3 pipeline.",
        epilog="Exit codes: 0 ok, 1 pipeline/prediction failure, 2 usage or configuration error.",
    )
    def add_log_options(p: argparse.ArgumentParser, default: Any) -> None:
        p.add_argument("--debug", action="store_true", default=default, help="show tracebacks and Prefect's own logs")
        p.add_argument("-v", "--verbose", action="store_true", default=default,
                       help="show Prefect's logs (flow/task states)")

    # Accepted before or after the command; SUPPRESS keeps a subcommand from resetting the top-level value.
    add_log_options(parser, False)
    common = argparse.ArgumentParser(add_help=False)
    add_log_options(common, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_home(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-home", metavar="DIR_OR_URI",
                       help="artifact store root (default: $NEWSGROUPS_LSTM_HOME or ~/.cache/newsgroups-lstm)")

    def add_run_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="config overrides, e.g. train.epochs=3 sources.corpus=news20 corpus.strip=headers,quotes")
        p.add_argument("-c", "--config", action="append", default=[], metavar="FILE",
                       help="TOML or JSON config file shaped like PipelineConfig (repeatable; later wins)")
        p.add_argument("--preset", choices=("default", "seed"),
                       help="training preset: default (best accuracy) or seed (the original recipe)")
        add_home(p)
        p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")

    run = sub.add_parser("run", parents=[common], help="run the pipeline (cached: unchanged steps are skipped)",
                         description="Run the pipeline up to --until. Precedence: defaults < --preset < "
                                     "--config files < KEY=VALUE < --data-home; NEWSGROUPS_LSTM_GLOVE_URL/_SHA256 "
                                     "and NEWSGROUPS_LSTM_CORPUS_URL/_SHA256 override the sources.")
    add_run_options(run)
    run.add_argument("--until", choices=STAGES, default="evaluate", help="stop after this stage (default: evaluate)")
    run.add_argument("--train-deployment", metavar="FLOW/DEPLOYMENT",
                     help="train and evaluate through this deployment (e.g. train-lstm/gpu) instead of in-process")
    run.set_defaults(func=cmd_run)

    data = sub.add_parser("data", parents=[common],
                          help="download and convert the corpus and GloVe to Parquet (= run --until data)",
                          description="Download both archives and build documents.parquet + vectors.parquet.")
    add_run_options(data)
    data.set_defaults(func=cmd_run, until="data", train_deployment=None)

    add_home(_add_inspect_parser(sub, common))
    _add_predict_parser(sub, common, add_home)
    add_home(_add_verify_parser(sub, common))
    _add_server_parser(sub, common)
    return parser


def _add_inspect_parser(sub, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    inspect = sub.add_parser("inspect", parents=[common],
                             help="list artifacts, or show one (manifest, Parquet schema, first rows)",
                             description="Without TARGET: list every artifact. TARGET: STEP (list that step), "
                                         "STEP/KEY (a unique key prefix is enough) or a path to an artifact "
                                         "directory or file.")
    inspect.add_argument("target", nargs="?", metavar="TARGET")
    inspect.add_argument("--lineage", action="store_true", help="walk TARGET's upstream artifacts")
    inspect.add_argument("--rows", type=int, default=5, help="rows to show per Parquet file (default 5)")
    inspect.set_defaults(func=cmd_inspect)
    return inspect


def _add_predict_parser(sub, common: argparse.ArgumentParser, add_home) -> None:
    predict = sub.add_parser("predict", parents=[common], help="classify texts with a trained run",
                             description="Classify texts given as arguments, files (--file) or stdin ('-').")
    predict.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify; '-' reads stdin")
    predict.add_argument("--run", metavar="RUN", help="train/KEY, a key prefix or a run directory (default: latest)")
    predict.add_argument("--file", action="append", default=[], metavar="PATH",
                         help="a file holding one document (repeatable)")
    predict.add_argument("--lines", action="store_true", help="treat each line of --file/stdin as one text")
    predict.add_argument("--top", type=int, default=3, help="probabilities to show per text (default 3)")
    predict.add_argument("--json", action="store_true", help="print JSON")
    add_home(predict)
    predict.set_defaults(func=cmd_predict)


def _add_verify_parser(sub, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    verify = sub.add_parser("verify", parents=[common], help="re-hash every stored file against its manifest",
                            description="Check every artifact (or one STEP or STEP/KEY) file by file against the "
                                        "sha256 in its manifest, ignoring the stamps of earlier checks. A damaged "
                                        "artifact is moved to <step>/.quarantine/ and rebuilt by the next run. "
                                        "Exit 0 if all is sound, 1 if anything was damaged.")
    verify.add_argument("target", nargs="?", metavar="STEP[/KEY]", help="only this step, or this artifact (key prefix)")
    verify.set_defaults(func=cmd_verify)
    return verify


def _add_server_parser(sub, common: argparse.ArgumentParser) -> None:
    server = sub.add_parser("server", parents=[common], help="the local Prefect server that `run` starts and reuses",
                            description=f"Without PREFECT_API_URL, `run` starts a Prefect server (API + UI) in the "
                                        f"background and later commands reuse it; it stops after ${IDLE_ENV} "
                                        f"(default {DEFAULT_IDLE_MINUTES:g}) idle minutes. 0 = no background server: "
                                        f"every command starts Prefect's temporary API instead.")
    server.add_argument("action", nargs="?", choices=("status", "start", "stop"), default="status",
                        help="status (default): its UI address; start: start it now; stop: stop it")
    server.set_defaults(func=cmd_server)


def _quiet_defaults(verbose: bool, debug: bool) -> None:
    """Environment defaults set before Prefect or TensorFlow is imported; the user's own settings win."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The first start of the embedded API on a fresh PREFECT_HOME runs DB migrations (can exceed 60 s).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    if not debug:  # TensorFlow's C++ log (oneDNN, CUDA probing) only with --debug; see tasks/model/native_log.py
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # Prefect creates its home without parents; a missing parent makes the embedded API fail to start.
    Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser().mkdir(parents=True, exist_ok=True)
    if not verbose:
        # Run logs still reach the Prefect API/UI; only the console copy (with tracebacks) is silenced.
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on a usage error
    _quiet_defaults(args.verbose or args.debug, args.debug)
    args.shutdown = shutdown = Shutdown().install()
    from flows.console import progress_output

    try:  # with -v/--debug, Prefect's console log shows the progress lines instead
        with nullcontext() if args.verbose or args.debug else progress_output():
            code = _run_command(args)
        shutdown.exit_if_signalled(code)
        return code
    finally:
        shutdown.uninstall()


def _run_command(args: argparse.Namespace) -> int:
    """args.func(args) with every outcome mapped to one line and an exit code."""
    from storage.errors import Interrupted, PipelineError
    from storage.files import is_write_error, write_error

    shutdown: Shutdown = args.shutdown
    try:
        code = args.func(args)
        return shutdown.finish() if shutdown.stopping else code  # a signal that came as the work ended
    except UsageError as exc:
        print(f"newsgroups-lstm: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (Stopped, KeyboardInterrupt):
        if not shutdown.stopping:  # a KeyboardInterrupt without our handler (main() called off the main thread)
            shutdown.signum = signal.SIGINT
        return shutdown.finish()
    except BaseException as exc:  # noqa: BLE001 - the CLI boundary: one line, a traceback only on request
        if shutdown.stopping:  # the stop's own Interrupted error, or whatever else the stop made fail
            return shutdown.finish(str(exc) if isinstance(exc, Interrupted) else "")
        if not isinstance(exc, Exception):
            raise
        if args.debug:
            traceback.print_exc()
        if is_write_error(exc) and exc.filename:  # e.g. creating the data home on a read-only file system
            exc = write_error(exc, exc.filename)
        kind = "" if isinstance(exc, PipelineError) else f"{type(exc).__name__}: "
        hint = "" if args.debug else " (--debug shows the traceback)"
        print(f"newsgroups-lstm: failed: {kind}{exc}{hint if not isinstance(exc, PipelineError) else ''}",
              file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
