"""GloVe parse: ours (Arrow, straight from the zip) vs the original recipe's Python loop, in one run;
plus the end-to-end data steps (download over loopback HTTP + corpus + glove) for both corpora.

    .venv/bin/python benchmarks/bench_glove.py [--data ../shared/data] [--repeats 2]
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import platform
import sys
import tempfile
import threading
import time
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tasks.config import CorpusConfig, GloveConfig, Source  # noqa: E402
from tasks.download import download  # noqa: E402
from tasks.glove import glove, glove_member, read_glove_zip  # noqa: E402

SHA256 = {  # from shared/data/README.md (repacked copies)
    "20news-bydate.tar.gz": "53027b79f71f27034d8d89a5b453d614685f400af36370c9df8766299899ec78",
    "news20.tar.gz": "f5b4cb9935511d1aea2c98747c26d4805ed77d2506ccb924c7e7bd196ebc8f70",
    "glove.6B.zip": "a91fc13449f05cce32e3752c5e0b8b7a9e1a948063e6222e43b8320682ab0c1d",
}


def original_recipe(zip_path: Path, dim: int) -> dict:
    """The recipe's loop, verbatim apart from reading the member out of the zip."""
    embeddings_index = {}
    with zipfile.ZipFile(zip_path) as zf, zf.open(glove_member(dim)) as raw:
        f = io.TextIOWrapper(raw, encoding="utf-8")
        for line in f:
            values = line.split()
            word = values[0]
            coefs = np.asarray(values[1:], dtype="float32")
            embeddings_index[word] = coefs
    return embeddings_index


def timed(fn, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve(directory: Path) -> ThreadingHTTPServer:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(directory)))
    threading.Thread(target=httpd.serve_forever, args=(0.1,), daemon=True).start()
    return httpd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    glove_zip, dim = args.data / "glove.6B.zip", 50

    ours_s, (table, _stats) = timed(lambda: read_glove_zip(glove_zip, dim), args.repeats)
    orig_s, index = timed(lambda: original_recipe(glove_zip, dim), args.repeats)
    # Same words, same vectors.
    probe = table.slice(123_456, 1).to_pylist()[0]
    assert len(index) == table.num_rows and np.array_equal(index[probe["word"]], np.float32(probe["vector"]))
    parse = {"ours_s": round(ours_s, 3), "original_loop_s": round(orig_s, 3), "speedup": round(orig_s / ours_s, 2),
             "words": table.num_rows, "dim": dim}
    del index, table

    httpd = serve(args.data)
    base = f"http://127.0.0.1:{httpd.server_port}"
    end_to_end = {}
    with tempfile.TemporaryDirectory(prefix="bench-glove-home-") as home:
        glove_src = Source(url=f"{base}/glove.6B.zip", sha256=SHA256["glove.6B.zip"])
        for corpus in ("20news-bydate.tar.gz", "news20.tar.gz"):
            source = Source(url=f"{base}/{corpus}", sha256=SHA256[corpus])
            timings, cached = {}, {}
            for _attempt, sink in (("first", timings), ("cached", cached)):
                t0 = time.perf_counter()
                archive = download.fn(source, data_home=home)
                t1 = time.perf_counter()
                docs = corpus.fn(CorpusConfig(), archive, data_home=home)
                t2 = time.perf_counter()
                gz = download.fn(glove_src, data_home=home)
                t3 = time.perf_counter()
                vectors = glove.fn(GloveConfig(dim=dim), gz, data_home=home)
                t4 = time.perf_counter()
                sink.update({"download_corpus_s": round(t1 - t0, 3), "corpus_s": round(t2 - t1, 3),
                             "download_glove_s": round(t3 - t2, 3), "glove_s": round(t4 - t3, 3),
                             "total_s": round(t4 - t0, 3)})
            from storage.artifacts import ArtifactStore

            manifest = ArtifactStore(home).read_manifest(docs)
            end_to_end[corpus] = {"first_run": timings, "second_run_cached": cached, "documents": docs.rows,
                                  "per_split": manifest["documents"], "latin1_fallbacks": manifest["latin1_fallbacks"],
                                  "vectors": vectors.rows}
    httpd.shutdown()

    results = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
               "repeats": args.repeats, "glove_parse": parse, "end_to_end": end_to_end}
    print(f"{'GloVe 50d parse (from the zip)':36s} {'seconds':>8s}")
    print(f"{'  original recipe (Python loop)':36s} {orig_s:8.2f}")
    print(f"{'  ours (Arrow CSV)':36s} {ours_s:8.2f}   speedup x{orig_s / ours_s:.2f}")
    for corpus, r in end_to_end.items():
        f, c = r["first_run"], r["second_run_cached"]
        print(f"{corpus:24s} docs {r['documents']:,} {r['per_split']} vectors {r['vectors']:,}: "
              f"first {f['total_s']:.2f}s (corpus {f['corpus_s']:.2f}s, glove {f['glove_s']:.2f}s), cached {c['total_s']:.3f}s")
    out = REPO / "benchmarks" / "results" / "bench_glove.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
