"""Memory and speed as the corpus grows: 20news-bydate replicated 1x, 10x, 50x, each run in a child process.

    .venv/bin/python benchmarks/bench_scale.py [--data ../shared/data] [--scales 1,10,50] [--work DIR]
                                               [--staged] [--train-scales 1,10] [--tokenize-scales 1,10]

For each scale N: a corpus archive with every document of 20news-bydate.tar.gz N times (copy k of a
file is named <file>-<k>; same folder layout; written copy after copy, about N x 14 MB), in a temporary
folder, served by file:// URL with the GloVe copy of ../shared/data. Then, each a child `newsgroups-lstm` process whose peak RSS
(ru_maxrss of a fresh wrapper process, so it covers the child and its own children) is recorded:
- `run --until embeddings` on an empty data home: wall time, per-step seconds and documents per second;
- with --staged, the same as three children (`--until data`, `--until tokens`, `--until embeddings`)
  on another empty data home: peak RSS per stage;
- tokenize on 1 core (taskset -c 0, parallel.shards=1) and on 2 cores (parallel.shards=2), the tokens
  artifact removed before each, both against one standing `prefect server` (no services): the tokens
  step's seconds (shards and join) and the shards' alone;
- one training epoch (train.epochs=1, --until train) on the data home of the first run.
Results: benchmarks/results/bench_scale.json. Run it on a quiet machine (1-minute load below 2).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from deployments.servers import prefect_server  # noqa: E402

GLOVE_SHA256 = "a91fc13449f05cce32e3752c5e0b8b7a9e1a948063e6222e43b8320682ab0c1d"
# Runs the command given as arguments and prints its peak RSS (KiB): this process waits for nothing else.
_WRAPPER = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc, file=sys.stderr)")


def replicate(source: Path, scale: int, dest: Path) -> Path:
    """`source` with every file member `scale` times (copy k >= 1 named <name>-<k>), same folders, gzip."""
    if scale == 1:
        return source
    members = []
    with tarfile.open(source, "r:gz") as tar:
        for info in tar:
            members.append((info, tar.extractfile(info).read() if info.isfile() else None))
    with tarfile.open(dest, "w:gz") as out:
        for info, data in members:
            if data is None:
                out.addfile(info)
        for k in range(scale):  # copy by copy of the whole corpus, so that gzip cannot fold a copy into its original
            for info, data in members:
                if data is not None:
                    copy = tarfile.TarInfo(info.name if k == 0 else f"{info.name}-{k}")
                    copy.size, copy.mtime, copy.mode = len(data), info.mtime, info.mode
                    out.addfile(copy, io.BytesIO(data))
    return dest


def child(args: list[str], env: dict, log: Path, cores: str | None = None) -> tuple[float, int, str]:
    """(wall seconds, peak RSS in MiB, stdout) of `newsgroups-lstm ARGS` in a fresh process."""
    command = [sys.executable, "-m", "flows.cli", *args]
    if cores:
        command = ["taskset", "-c", cores, *command]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _WRAPPER, *command], cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    log.write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
    maxrss_kib, rc = done.stderr.strip().splitlines()[-1].split()
    if int(rc) != 0:
        raise SystemExit(f"{' '.join(args)} failed (exit {rc}); see {log}")
    return round(wall, 2), round(int(maxrss_kib) / 1024), done.stdout


def summary_of(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("\n{") + 1:] if not stdout.startswith("{") else stdout)


def step_figures(summary: dict, documents: int) -> dict:
    figures = {}
    for name, step in summary["steps"].items():
        seconds = step["seconds"]  # for tokens: its shards and the join
        figures[name] = {"seconds": round(seconds, 2), "state": step["state"]}
        if name in ("corpus", "tokens"):
            figures[name]["documents_per_second"] = round(documents / seconds) if seconds else None
    return figures


def run_scale(scale: int, archive: Path, work: Path, env: dict, opts: argparse.Namespace) -> dict:
    config = work / f"config-{scale}.json"
    config.write_text(json.dumps({"sources": {
        "corpus_source": {"url": archive.as_uri(), "filename": archive.name},
        "glove": {"url": (opts.data / "glove.6B.zip").resolve().as_uri(), "sha256": GLOVE_SHA256}}}))
    home = work / f"home-{scale}"
    base = ["run", "-c", str(config), "--json", "--data-home", str(home)]
    result: dict = {"archive_bytes": archive.stat().st_size}
    wall, rss, out = child([*base, "--until", "embeddings"], env, work / f"run-{scale}.log")
    summary = summary_of(out)
    documents = summary["steps"]["corpus"]["rows"]
    result.update(documents=documents, run_until_embeddings={"wall_seconds": wall, "peak_rss_mib": rss,
                                                             "steps": step_figures(summary, documents)})
    print(f"{scale}x: {documents:,} documents, run --until embeddings {wall} s, peak RSS {rss} MiB", flush=True)
    if opts.staged:
        staged_home = work / f"staged-{scale}"
        result["staged_peak_rss_mib"] = {}
        for stage in ("data", "tokens", "embeddings"):
            args = ["run", "-c", str(config), "--json", "--data-home", str(staged_home), "--until", stage]
            _, result["staged_peak_rss_mib"][stage], _ = child(args, env, work / f"staged-{scale}-{stage}.log")
        shutil.rmtree(staged_home, ignore_errors=True)
        print(f"{scale}x: peak RSS by stage {result['staged_peak_rss_mib']}", flush=True)
    if scale in opts.tokenize_scales:
        result["tokenize"] = {}
        # against a standing server, as a scaled-out user runs: a child's own local API would still be starting
        # while its tokens step runs (a fixed cost of seconds in both figures, not tokenizing)
        with prefect_server(ui=False, services=False, base_dir=work) as server:
            for label, cores, shards in (("1_core", "0", 1), ("2_cores", None, 2)):
                shutil.rmtree(home / "tokens", ignore_errors=True)
                wall, rss, out = child([*base, "--until", "tokens", f"parallel.shards={shards}"],
                                       {**env, **server.client_env}, work / f"tokenize-{scale}-{label}.log", cores)
                step = summary_of(out)["steps"]["tokens"]
                result["tokenize"][label] = {"seconds": round(step["seconds"], 2), "peak_rss_mib": rss, "shards": shards,
                                             "shard_seconds": step.get("shard_seconds")}
        one, two = result["tokenize"]["1_core"]["seconds"], result["tokenize"]["2_cores"]["seconds"]
        result["tokenize"]["speedup"] = round(one / two, 2)
        print(f"{scale}x: tokenize 1 core {one} s, 2 cores {two} s ({result['tokenize']['speedup']}x)", flush=True)
    if scale in opts.train_scales:
        wall, rss, out = child([*base, "--until", "train", "train.epochs=1"], env, work / f"train-{scale}.log")
        train_ref = summary_of(out)["artifacts"]["train"]
        manifest = json.loads((Path(train_ref["uri"]) / "manifest.json").read_text())
        epoch = manifest["training"]["seconds_per_epoch"][0]
        result["train_one_epoch"] = {"epoch_seconds": epoch, "peak_rss_mib": rss, "wall_seconds": wall}
        print(f"{scale}x: one epoch {epoch} s, peak RSS {rss} MiB", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--scales", default="1,10,50")
    parser.add_argument("--tokenize-scales", default="1,10")
    parser.add_argument("--train-scales", default="1,10")
    parser.add_argument("--staged", action="store_true", help="also peak RSS per stage (three more runs per scale)")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one, removed)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_scale.json")
    opts = parser.parse_args()
    opts.tokenize_scales = {int(s) for s in opts.tokenize_scales.split(",") if s}
    opts.train_scales = {int(s) for s in opts.train_scales.split(",") if s}
    work = opts.work or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(work / "prefect"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING", "TF_CPP_MIN_LOG_LEVEL": "2",
           "CUDA_VISIBLE_DEVICES": ""}
    env.pop("PREFECT_API_URL", None)  # each child starts Prefect's temporary local API
    # The first start on a fresh PREFECT_HOME migrates its database (a minute): not part of any figure.
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"  # a busy machine starts it slowly
    for _ in range(3):
        warm = subprocess.run([sys.executable, "-c", "from prefect import flow\n@flow\ndef warm_up():\n    pass\nwarm_up()"],
                              env=env, cwd=REPO, capture_output=True, text=True)
        if warm.returncode == 0:
            break
        print(f"warm-up failed, retrying: {warm.stderr[-500:]}", flush=True)
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
               "load_at_start": os.getloadavg(), "scales": {}}
    try:
        for scale in [int(s) for s in opts.scales.split(",")]:
            started = time.perf_counter()
            archive = replicate(opts.data / "20news-bydate.tar.gz", scale, work / f"20news-bydate-x{scale}.tar.gz")
            print(f"{scale}x: archive {archive.stat().st_size / 1e6:.0f} MB in {time.perf_counter() - started:.0f} s", flush=True)
            results["scales"][f"{scale}x"] = run_scale(scale, archive, work, env, opts)
            for path in (work / f"home-{scale}", work / f"20news-bydate-x{scale}.tar.gz"):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            opts.out.write_text(json.dumps(results, indent=2) + "\n")  # what is measured so far survives a later failure
    finally:
        if opts.work is None:
            shutil.rmtree(work, ignore_errors=True)
    results["load_at_end"] = os.getloadavg()
    opts.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
