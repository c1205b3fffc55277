"""Text the CLI prints: the end-of-run summary, artifact listings, lineage, manifests, predictions."""

from __future__ import annotations

import json
from typing import Any


def table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [[str(c) for c in header]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def summary(result: dict) -> str:
    """The end-of-run table: state, time, rows and location per step, then the headline metrics."""
    rows = [[name, s.get("state"), f"{s.get('seconds', 0):.1f}", s.get("rows"), s.get("uri")]
            for name, s in result["steps"].items()]
    out = [table(rows, ["step", "state", "seconds", "rows", "artifact"])]
    states = [s.get("state") for s in result["steps"].values()]
    out.append(f"\ncache hits: {states.count('Cached')}/{len(states)} steps   total: {result['seconds']:.1f} s"
               f"   data home: {result['data_home']}")
    metrics = result.get("metrics") or {}
    shown = [(label, metrics[key]) for key, label in (("accuracy", "accuracy"), ("macro_f1", "macro-F1"))
             if isinstance(metrics.get(key), (int, float))]
    if shown:
        out.append("   ".join(f"{label}: {value:.4f}" for label, value in shown))
    flow_run = result.get("flow_run") or {}
    if flow_run.get("ui_url"):
        out.append(f"Prefect flow run {flow_run.get('name')}: {flow_run['ui_url']}")
    return "\n".join(out)


def artifact_list(manifests: list[dict], root: str) -> str:
    if not manifests:
        return f"no artifacts in {root}"
    rows = []
    for m in manifests:
        params = json.dumps(m.get("params"), separators=(",", ":"), default=str)
        rows.append([m["step"], m["key"], m.get("rows"), size(sum(f.get("bytes", 0) for f in m.get("files", {}).values())),
                     m.get("created", "")[:19], params if len(params) <= 70 else params[:67] + "..."])
    return table(rows, ["step", "key", "rows", "size", "created", "params"]) + f"\n\n{len(rows)} artifacts in {root}"


def lineage(walk) -> str:
    """Lines of store.lineage(): one per artifact, indented under what it was built from."""
    lines, seen = [], set()
    for depth, step, key, manifest in walk:
        indent = "    " * (depth - 1) + "└── " if depth else ""
        if manifest is None:
            lines.append(f"{indent}{step}/{key}  (missing: deleted or not built yet)")
        elif (step, key) in seen:
            lines.append(f"{indent}{step}/{key}  (see above)")
        else:
            lines.append(f"{indent}{step}/{key}  rows={manifest.get('rows')}  created={manifest.get('created', '')[:19]}")
        seen.add((step, key))
    return "\n".join(lines)


def parquet_preview(name: str, rows: int, schema, head) -> str:
    out = f"\n== {name}: {rows} rows\n{schema}"
    if head is not None and head.num_rows:
        import pandas as pd

        with pd.option_context("display.max_columns", 20, "display.width", 160, "display.max_colwidth", 60):
            out += "\n" + head.to_pandas().to_string(max_rows=head.num_rows)
    return out


def prediction(r: dict) -> str:
    """One line: the label, the top probabilities and the start of the text, tab-separated."""
    snippet = printable(" ".join(r["text"].split()))
    snippet = snippet if len(snippet) <= 60 else snippet[:57] + "..."
    top = "  ".join(f"{printable(t['label'])} {t['probability']:.3f}" for t in r["top"])
    return f"{printable(r['label'])}\t{top}\t{snippet}"


def printable(text: str) -> str:
    """`text` safe to print on a terminal: characters that are not printable (ESC and the other controls,
    bidirectional overrides, ...) are shown escaped, as Python writes them (\\x1b, \\u202e)."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def _spread(row: dict, measure: str) -> str | None:
    mean, std = row.get(f"{measure}_mean"), row.get(f"{measure}_std")
    if mean is None:
        return None
    return f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def sweep(result: dict) -> str:
    """The sweep's comparison table (mean ± sample standard deviation over seeds), then how its steps ended."""
    rows = [[r["config"], r["runs"], *(_spread(r, m) for m in ("accuracy", "macro_f1", "val_accuracy", "lstm_accuracy")),
             None if r.get("seconds_per_epoch") is None else f"{r['seconds_per_epoch']:.1f}"] for r in result["table"]]
    out = [table(rows, ["config", "seeds", "accuracy", "macro-F1", "val. accuracy", "LSTM alone", "s/epoch"])]
    states = [s["state"] for run in result["runs"] for s in run["steps"].values()]
    data = [state for steps in result["data_steps"] for state in steps.values()]
    out.append(f"\n{len(result['runs'])} runs (seeds {', '.join(map(str, result['seeds']))}): "
               f"{states.count('Cached')}/{len(states)} train/evaluate steps Cached, "
               f"{data.count('Cached')}/{len(data)} data steps Cached, table {result['state']}"
               f"   total: {result['seconds']:.1f} s")
    out.append(f"table: {result['artifact']['uri']}/table.parquet (per run: runs.parquet)")
    return "\n".join(out)
