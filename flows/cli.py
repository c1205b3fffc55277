"""`newsgroups-lstm`: run the pipeline, inspect artifacts, classify text.

Exit codes scripts can rely on: 0 ok, 1 the pipeline (or a prediction) failed, 2 usage or
configuration error. Errors print one line; --debug adds the traceback and Prefect's logs.
The command line maps onto tasks.config.PipelineConfig; it does not repeat it:
`train.epochs=3` sets PipelineConfig.train.epochs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any, get_args, get_origin

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
STAGES = ("data", "tokens", "embeddings", "train", "evaluate")  # flows.pipeline.STAGES, without importing Prefect


class UsageError(Exception):
    """A bad command line or config file: exit code 2."""


# -- configuration ------------------------------------------------------------------------------

def load_config_file(path: str) -> dict:
    """A TOML or JSON file shaped like PipelineConfig (tables/objects for the sub-configs)."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"config file {path} not found")
    text = file.read_text()
    try:
        if file.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import tomllib

            data = tomllib.loads(text)
    except (ValueError, json.JSONDecodeError) as exc:
        raise UsageError(f"config file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {path}: expected a table/object at the top level")
    return data


def _field_annotation(path: list[str]) -> Any:
    """The type annotation of a dotted PipelineConfig field, or None if the path is not a field."""
    from pydantic import BaseModel

    from tasks.config import PipelineConfig

    model: Any = PipelineConfig
    annotation = None
    for part in path:
        candidates = [model] if isinstance(model, type) else list(get_args(model))
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None or part not in model.model_fields:
            return None
        annotation = model = model.model_fields[part].annotation
    return annotation


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value`: the value is read as JSON when it parses (3, true, null, [..]), else as a string;
    a comma-separated string for a tuple field becomes a list (corpus.strip=headers,quotes)."""
    key, sep, raw = item.partition("=")
    path = [p for p in key.strip().split(".") if p]
    if not sep or not path:
        raise UsageError(f"override {item!r}: expected key=value, e.g. train.epochs=3")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    if isinstance(value, str) and get_origin(_field_annotation(path)) in (tuple, list):
        value = [v.strip() for v in value.split(",") if v.strip()]
    return path, value


def _merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def build_config(config_files: list[str], overrides: list[str], preset: str | None = None,
                 data_home: str | None = None):
    """PipelineConfig from, in increasing precedence: defaults, --preset, config files, key=value, --data-home."""
    from pydantic import ValidationError

    from tasks import config as config_module

    data: dict = {}
    if preset:  # the preset's full settings, so files and KEY=VALUE can still adjust single fields
        data = config_module.with_preset(config_module.PipelineConfig(), preset).model_dump(mode="json")
    for path in config_files:
        _merge(data, load_config_file(path))
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            if not isinstance(node.setdefault(part, {}), dict):
                raise UsageError(f"override {item!r}: {part} is not a section")
            node = node[part]
        node[path[-1]] = value
    if data_home:
        data["data_home"] = data_home
    try:
        return config_module.PipelineConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in exc.errors())
        raise UsageError(f"invalid configuration: {problems}") from None


# -- output helpers -----------------------------------------------------------------------------

def _table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [[str(c) for c in header]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_summary(summary: dict) -> str:
    """The end-of-run table: state, time, rows and location per step, then the headline metrics."""
    rows = [[name, s.get("state"), f"{s.get('seconds', 0):.1f}", s.get("rows"), s.get("uri")]
            for name, s in summary["steps"].items()]
    out = [_table(rows, ["step", "state", "seconds", "rows", "artifact"])]
    states = [s.get("state") for s in summary["steps"].values()]
    out.append(f"\ncache hits: {states.count('Cached')}/{len(states)} steps   total: {summary['seconds']:.1f} s"
               f"   data home: {summary['data_home']}")
    metrics = summary.get("metrics") or {}
    shown = [(label, metrics[key]) for key, label in (("accuracy", "accuracy"), ("macro_f1", "macro-F1"))
             if isinstance(metrics.get(key), (int, float))]
    if shown:
        out.append("   ".join(f"{label}: {value:.4f}" for label, value in shown))
    return "\n".join(out)


# -- commands -----------------------------------------------------------------------------------

def cmd_run(args: argparse.Namespace) -> int:
    config = build_config(args.config, args.overrides, args.preset, args.data_home)
    from flows.pipeline import pipeline

    summary = pipeline(config, until=args.until)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(format_summary(summary))
    return EXIT_OK


def _store(args: argparse.Namespace):
    from storage.artifacts import ArtifactStore

    return ArtifactStore(args.data_home)


def resolve_artifact(store, target: str) -> tuple[str, str]:
    """(step, key) for `step/key` (a unique key prefix is enough), a bare key, or an artifact directory path."""
    path = Path(target)
    if path.exists():
        directory = path if path.is_dir() else path.parent
        manifest = directory / "manifest.json"
        if not manifest.is_file():
            raise UsageError(f"{target} is not an artifact directory (no manifest.json)")
        data = json.loads(manifest.read_text())
        return data["step"], data["key"]
    step, _, key = target.strip("/").rpartition("/")
    matches = [(m["step"], m["key"]) for m in store.list()
               if (not step or m["step"] == step) and m["key"].startswith(key)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise UsageError(f"no artifact {target!r} in {store.root} (list them with `newsgroups-lstm inspect`)")
    raise UsageError(f"{target!r} is ambiguous: " + ", ".join(f"{s}/{k}" for s, k in matches[:5]))


def cmd_inspect(args: argparse.Namespace) -> int:
    store = _store(args)
    if args.target and "/" not in args.target and not Path(args.target).exists() and \
            any(m["step"] == args.target for m in store.list()):
        return _list_artifacts(store, step=args.target)
    if not args.target:
        if args.lineage:
            raise UsageError("--lineage needs an artifact: newsgroups-lstm inspect --lineage runs/<key>")
        return _list_artifacts(store)
    step, key = resolve_artifact(store, args.target)
    if args.lineage:
        print("\n".join(_lineage(store, step, key)))
        return EXIT_OK
    manifest = store.read_manifest(step, key)
    print(json.dumps(manifest, indent=2))
    if Path(args.target).is_file() and args.target.endswith(".parquet"):
        names = [Path(args.target).name]
    else:
        names = [n for n in manifest.get("files", {}) if n.endswith(".parquet")]
    directory = None
    for name in names:
        import pyarrow.parquet as pq

        directory = directory or store.local_dir(store.find(step, key) or _ref(store, step, key))
        file = pq.ParquetFile(directory / name)
        print(f"\n== {name}: {file.metadata.num_rows} rows\n{file.schema_arrow}")
        head = file.read_row_groups([0]).slice(0, args.rows) if file.num_row_groups else None
        if head is not None and head.num_rows:
            import pandas as pd

            with pd.option_context("display.max_columns", 20, "display.width", 160, "display.max_colwidth", 60):
                print(head.to_pandas().to_string(max_rows=args.rows))
    return EXIT_OK


def _ref(store, step: str, key: str):
    from storage.artifacts import ArtifactRef

    return ArtifactRef(step=step, key=key, uri=store.uri(step, key))


def _list_artifacts(store, step: str | None = None) -> int:
    manifests = [m for m in store.list() if step is None or m["step"] == step]
    if not manifests:
        print(f"no artifacts in {store.root}")
        return EXIT_OK
    rows = []
    for m in manifests:
        size = sum(f.get("bytes", 0) for f in m.get("files", {}).values())
        params = json.dumps(m.get("params"), separators=(",", ":"), default=str)
        rows.append([m["step"], m["key"], m.get("rows"), _size(size), m.get("created", "")[:19],
                     params if len(params) <= 70 else params[:67] + "..."])
    print(_table(rows, ["step", "key", "rows", "size", "created", "params"]))
    print(f"\n{len(rows)} artifacts in {store.root}")
    return EXIT_OK


def _lineage(store, step: str, key: str, depth: int = 0, seen: set | None = None) -> list[str]:
    seen = set() if seen is None else seen
    indent = "    " * (depth - 1) + "└── " if depth else ""
    manifest = store.read_manifest(step, key)
    if manifest is None:
        return [f"{indent}{step}/{key}  (missing: deleted or not built yet)"]
    if (step, key) in seen:
        return [f"{indent}{step}/{key}  (see above)"]
    seen.add((step, key))
    lines = [f"{indent}{step}/{key}  rows={manifest.get('rows')}  created={manifest.get('created', '')[:19]}"]
    for up in manifest.get("upstream", []):
        lines += _lineage(store, up["step"], up["key"], depth + 1, seen)
    return lines


def _latest_run(store):
    runs = [m for m in store.list() if m["step"] == "runs"]
    if not runs:
        raise UsageError(f"no trained run in {store.root}: run `newsgroups-lstm run` first")
    return runs[-1]["step"], runs[-1]["key"]


def _read_texts(args: argparse.Namespace) -> list[str]:
    chunks: list[str] = []
    for path in args.file:
        if not Path(path).is_file():
            raise UsageError(f"text file {path} not found")
        chunks.append(Path(path).read_text(encoding="utf-8", errors="replace"))
    texts = list(args.texts)
    if "-" in texts or (not texts and not chunks and not sys.stdin.isatty()):
        texts = [t for t in texts if t != "-"]
        chunks.append(sys.stdin.read())
    if args.lines:
        texts += [line for chunk in chunks for line in chunk.splitlines() if line.strip()]
    else:
        texts += chunks
    if not texts:
        raise UsageError("nothing to classify: give texts as arguments, --file PATH, or pipe them on stdin")
    return texts


def cmd_predict(args: argparse.Namespace) -> int:
    store = _store(args)
    step, key = resolve_artifact(store, args.run) if args.run else _latest_run(store)
    if step != "runs":
        raise UsageError(f"{step}/{key} is not a trained run (expected runs/<key>)")
    texts = _read_texts(args)
    ref = store.find(step, key)
    if ref is None:
        raise UsageError(f"run {step}/{key} is incomplete or damaged in {store.root}")
    from tasks.predict import predict

    results = []
    for text, prediction in zip(texts, predict(store.local_dir(ref), texts)):
        top = sorted(prediction.probabilities.items(), key=lambda kv: kv[1], reverse=True)[: args.top]
        results.append({"text": text, "label": prediction.label,
                        "top": [{"label": k, "probability": float(v)} for k, v in top]})
    if args.json:
        print(json.dumps({"run": f"{step}/{key}", "predictions": results}, indent=2))
        return EXIT_OK
    for r in results:
        snippet = " ".join(r["text"].split())
        snippet = snippet if len(snippet) <= 60 else snippet[:57] + "..."
        top = "  ".join(f"{t['label']} {t['probability']:.3f}" for t in r["top"])
        print(f"{r['label']}\t{top}\t{snippet}")
    return EXIT_OK


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
    run.set_defaults(func=cmd_run)

    data = sub.add_parser("data", parents=[common], help="download and convert the corpus and GloVe to Parquet (= run --until data)",
                          description="Download both archives and build documents.parquet + vectors.parquet.")
    add_run_options(data)
    data.set_defaults(func=cmd_run, until="data")

    inspect = sub.add_parser("inspect", parents=[common], help="list artifacts, or show one (manifest, Parquet schema, first rows)",
                             description="Without TARGET: list every artifact. TARGET: STEP (list that step), "
                                         "STEP/KEY (a unique key prefix is enough) or a path to an artifact "
                                         "directory or file.")
    inspect.add_argument("target", nargs="?", metavar="TARGET")
    inspect.add_argument("--lineage", action="store_true", help="walk TARGET's upstream artifacts")
    inspect.add_argument("--rows", type=int, default=5, help="rows to show per Parquet file (default 5)")
    add_home(inspect)
    inspect.set_defaults(func=cmd_inspect)

    predict = sub.add_parser("predict", parents=[common], help="classify texts with a trained run",
                             description="Classify texts given as arguments, files (--file) or stdin ('-').")
    predict.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify; '-' reads stdin")
    predict.add_argument("--run", metavar="RUN", help="runs/KEY, a key prefix or a run directory (default: latest)")
    predict.add_argument("--file", action="append", default=[], metavar="PATH",
                         help="a file holding one document (repeatable)")
    predict.add_argument("--lines", action="store_true", help="treat each line of --file/stdin as one text")
    predict.add_argument("--top", type=int, default=3, help="probabilities to show per text (default 3)")
    predict.add_argument("--json", action="store_true", help="print JSON")
    add_home(predict)
    predict.set_defaults(func=cmd_predict)
    return parser


def _quiet_defaults(verbose: bool) -> None:
    """Environment defaults set before Prefect is imported; the user's own settings win."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The first start of the embedded API on a fresh PREFECT_HOME runs DB migrations (can exceed 60 s).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # Prefect creates its home without parents; a missing parent makes the embedded API fail to start.
    Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser().mkdir(parents=True, exist_ok=True)
    if not verbose:
        # Run logs still reach the Prefect API/UI; only the console copy (with tracebacks) is silenced.
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
        from tasks.common import PROGRESS_LOGGER  # imports Prefect: only after the settings above

        progress = logging.getLogger(PROGRESS_LOGGER)
        if not any(isinstance(h, _StderrHandler) for h in progress.handlers):
            handler = _StderrHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s  %(message)s", "%H:%M:%S"))
            progress.addHandler(handler)
        progress.setLevel(logging.INFO)
        progress.propagate = False


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (it may be replaced after set-up)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on a usage error
    _quiet_defaults(args.verbose or args.debug)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"newsgroups-lstm: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("newsgroups-lstm: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI boundary: one line, a traceback only on request
        from storage.errors import PipelineError

        if args.debug:
            traceback.print_exc()
        kind = "" if isinstance(exc, PipelineError) else f"{type(exc).__name__}: "
        hint = "" if args.debug else " (--debug shows the traceback)"
        print(f"newsgroups-lstm: failed: {kind}{exc}{hint if not isinstance(exc, PipelineError) else ''}",
              file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
