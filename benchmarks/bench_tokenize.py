"""Tokenize + embedding matrix: ours vs the original recipe (Keras Tokenizer, GloVe dict loop), in one run.

    .venv/bin/python benchmarks/bench_tokenize.py [--data ../shared/data] [--repeats 3]

Real data reaches the steps over a loopback HTTP server with the checksums of shared/data/README.md
(download -> corpus -> glove from the data-layer tasks). Sections:
1. parity on the 19,997-message news20 collection, all texts, with the text variant the Keras example
   read (latin-1, text-mode newlines, headers kept), plus the other variants' distinct-word counts;
2. tokenize speed: ours vs tf_keras Tokenizer.fit_on_texts + texts_to_sequences on the same texts,
   and the tokenize task (train-only fit, Parquet in/out) vs Keras doing the same job;
3. embedding matrix: ours vs the recipe's dict loop; warm reload from the cache vs the GloVe parse;
4. coverage of the 20news-bydate training vocabulary by GloVe 50d.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_glove import SHA256, serve, timed  # noqa: E402
from bench_glove import original_recipe as recipe_glove_parse  # noqa: E402

from storage.artifacts import ArtifactStore  # noqa: E402
from storage.schemas import DOCUMENTS, SEQUENCES, VOCAB  # noqa: E402
from tasks.config import CorpusConfig, EmbeddingsConfig, GloveConfig, Source, TokenizeConfig  # noqa: E402
from tasks.corpus import corpus  # noqa: E402
from tasks.download import download  # noqa: E402
from tasks.embeddings import embedding_matrix, embeddings, read_vectors  # noqa: E402
from tasks.glove import glove  # noqa: E402
from tasks.tokenizer import Rules, count_words, encode, split_words, vocabulary  # noqa: E402
from tasks.tokens import BATCH_ROWS  # noqa: E402
from tasks.tokens import tokens as tokenize  # noqa: E402

RECIPE_WORDS = 20_000  # the recipe's MAX_NB_WORDS


def recipe_texts(archive: Path, skip_header: bool) -> list[str]:
    """The Keras example's reader: sorted groups, sorted digit-named files, open(..., encoding="latin-1")
    in text mode (universal newlines), optionally skipping the header up to the first blank line."""
    by_group: dict[str, dict[str, bytes]] = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if member.isfile():
                *_, group, name = member.name.split("/")
                by_group.setdefault(group, {})[name] = tar.extractfile(member).read()
    texts = []
    for group in sorted(by_group):
        for name in sorted(by_group[group]):
            if name.isdigit():
                t = io.TextIOWrapper(io.BytesIO(by_group[group][name]), encoding="latin-1").read()
                if skip_header:
                    i = t.find("\n\n")
                    if 0 < i:
                        t = t[i:]
                texts.append(t)
    return texts


def ours_in_memory(texts: pa.Array, num_words: int, rules: Rules) -> tuple[pa.Table, int, list[pa.ListArray]]:
    """Our pure functions over record batches: split once, count, vocabulary, ids."""
    words = [split_words(texts.slice(i, BATCH_ROWS), rules) for i in range(0, len(texts), BATCH_ROWS)]
    counts = count_words(words)
    vocab = vocabulary(counts, num_words)
    return vocab, counts.num_rows, [encode(w, vocab, rules)[0] for w in words]


def keras_job(fit_texts: list[str], all_texts: list[str], num_words: int):
    from tf_keras.preprocessing.text import Tokenizer

    tokenizer = Tokenizer(num_words=num_words)
    tokenizer.fit_on_texts(fit_texts)
    return tokenizer, tokenizer.texts_to_sequences(all_texts)


def keras_top(tokenizer, n: int) -> list[str]:
    return [w for w, _ in sorted(tokenizer.word_index.items(), key=lambda kv: kv[1])[:n]]


def recipe_matrix(word_index: dict[str, int], embeddings_index: dict, dim: int) -> np.ndarray:
    """The recipe's loop, verbatim."""
    num_words = min(RECIPE_WORDS, len(word_index))
    embedding_matrix_ = np.zeros((num_words + 1, dim))
    for word, i in word_index.items():
        if i > RECIPE_WORDS:
            continue
        embedding_vector = embeddings_index.get(word)
        if embedding_vector is not None:
            embedding_matrix_[i] = embedding_vector
    return embedding_matrix_


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
                     "repeats": args.repeats}
    rules = Rules()
    httpd = serve(args.data)
    base = f"http://127.0.0.1:{httpd.server_port}"
    with tempfile.TemporaryDirectory(prefix="bench-tokenize-home-") as home:
        run(args, results, rules, base, home, httpd)


def run(args, results: dict, rules: Rules, base: str, home: str, httpd) -> None:
    store = ArtifactStore(home)
    fetch = {name: download.fn(Source(url=f"{base}/{name}", sha256=SHA256[name]), data_home=home) for name in SHA256}
    news20 = corpus.fn(CorpusConfig(), fetch["news20.tar.gz"], data_home=home)
    bydate = corpus.fn(CorpusConfig(), fetch["20news-bydate.tar.gz"], data_home=home)
    vectors = glove.fn(GloveConfig(dim=50), fetch["glove.6B.zip"], data_home=home)
    httpd.shutdown()

    # 1 + 2a. news20, all texts, the Keras example's text variant: parity and speed.
    archive = store.local_dir(fetch["news20.tar.gz"]) / "news20.tar.gz"
    texts = recipe_texts(archive, skip_header=False)
    keras_s, (tokenizer, keras_seqs) = timed(lambda: keras_job(texts, texts, RECIPE_WORDS + 1), 1)
    arr = pa.array(texts, pa.string())
    ours_s, (vocab, distinct, ids) = timed(lambda: ours_in_memory(arr, RECIPE_WORDS, rules), args.repeats)
    same_top = vocab["token"].to_pylist() == keras_top(tokenizer, RECIPE_WORDS)
    ours_seqs = [x for chunk in ids for x in chunk.to_pylist()]
    variants = {"latin-1, text-mode newlines, full file (Keras example minus header skip)": distinct}
    for label, t in (("latin-1, text-mode newlines, header skipped (the Keras example)", recipe_texts(archive, True)),
                     ("pipeline documents.parquet (UTF-8 else latin-1, bytes as stored, full file)",
                      store.read_parquet(news20, "documents.parquet", DOCUMENTS)["text"])):
        variants[label] = count_words([split_words(t, rules)]).num_rows
    results["news20_all_texts"] = {
        "documents": len(texts), "distinct_words_keras": len(tokenizer.word_index), "distinct_words_ours": distinct,
        "same_top_20000": same_top, "same_sequences": ours_seqs == keras_seqs,
        "keras_fit_plus_sequences_s": round(keras_s, 3), "ours_s": round(ours_s, 3), "speedup": round(keras_s / ours_s, 2),
        "distinct_words_by_text_variant": variants,
    }
    del tokenizer, keras_seqs, ours_seqs, ids

    # 2b. The task on news20 documents.parquet (train-only fit, Parquet read + write) vs Keras doing that job.
    docs = store.read_parquet(news20, "documents.parquet", DOCUMENTS)
    all_texts = docs["text"].to_pylist()
    train_texts = [t for t, s in zip(all_texts, docs["split"].to_pylist()) if s == "train"]
    keras_task_s, (tokenizer, keras_seqs) = timed(lambda: keras_job(train_texts, all_texts, RECIPE_WORDS + 1), 1)
    cfg = TokenizeConfig(num_words=RECIPE_WORDS, max_length=100_000)
    task_times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        tokens = tokenize.fn(cfg, news20, data_home=home)
        task_times.append(time.perf_counter() - t0)
        store.remove(tokens.step, tokens.key)
    tokens = tokenize.fn(cfg, news20, data_home=home)
    task_vocab = store.read_parquet(tokens, "vocab.parquet", VOCAB)
    task_seqs = store.read_parquet(tokens, "sequences.parquet", SEQUENCES)
    task_s = min(task_times)
    results["news20_task"] = {
        "train_documents": len(train_texts), "documents": len(all_texts),
        "same_vocab_as_keras_on_train": task_vocab["token"].to_pylist() == keras_top(tokenizer, RECIPE_WORDS),
        "same_sequences_as_keras": task_seqs["ids"].to_pylist() == keras_seqs,
        "keras_s": round(keras_task_s, 3), "task_s": round(task_s, 3), "speedup": round(keras_task_s / task_s, 2),
        "distinct_train_words": store.read_manifest(tokens)["distinct_train_words"],
    }
    del tokenizer, keras_seqs, task_seqs

    # 3. Embedding matrix on 20news-bydate (recipe's 20,000 words) vs the recipe's dict loop.
    bytokens = tokenize.fn(TokenizeConfig(num_words=RECIPE_WORDS), bydate, data_home=home)
    vocab = store.read_parquet(bytokens, "vocab.parquet", VOCAB)
    word_index = dict(zip(vocab["token"].to_pylist(), vocab["id"].to_pylist()))
    glove_zip = store.local_dir(fetch["glove.6B.zip"]) / "glove.6B.zip"
    parse_s, embeddings_index = timed(lambda: recipe_glove_parse(glove_zip, 50), 1)
    loop_s, recipe = timed(lambda index=embeddings_index: recipe_matrix(word_index, index, 50), args.repeats)
    del embeddings_index
    vector_table = read_vectors(store, vectors)
    pure_s, (matrix, _hit) = timed(lambda: embedding_matrix(vocab, vector_table, "zeros"), args.repeats)
    same_matrix = np.array_equal(matrix, recipe.astype(np.float32))
    emb_times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        emb = embeddings.fn(EmbeddingsConfig(), bytokens, vectors, data_home=home)
        emb_times.append(time.perf_counter() - t0)
        store.remove(emb.step, emb.key)
    emb = embeddings.fn(EmbeddingsConfig(), bytokens, vectors, data_home=home)

    def warm_reload():
        v = store.read_parquet(bytokens, "vocab.parquet", VOCAB)
        s = store.read_parquet(bytokens, "sequences.parquet", SEQUENCES)
        m = np.load(store.local_dir(emb) / "matrix.npy", mmap_mode="r")
        return v.num_rows, s.num_rows, m.shape

    reload_s, _ = timed(warm_reload, max(args.repeats, 10))
    results["embeddings_bydate_20000"] = {
        "recipe_glove_parse_s": round(parse_s, 3), "recipe_matrix_loop_s": round(loop_s, 4),
        "ours_matrix_s": round(pure_s, 4), "matrix_speedup": round(loop_s / pure_s, 2),
        "ours_task_s": round(min(emb_times), 3), "recipe_parse_plus_loop_vs_task": round((parse_s + loop_s) / min(emb_times), 2),
        "same_matrix_as_recipe_with_zero_misses": same_matrix,
        "warm_reload_tokens_plus_matrix_s": round(reload_s, 4), "reload_vs_recipe_glove_parse": round(parse_s / reload_s, 1),
    }

    # 4. Coverage of the bydate training vocabulary (default num_words and the recipe's 20,000).
    coverage = {}
    for num_words in (TokenizeConfig().num_words, RECIPE_WORDS):
        t = tokenize.fn(TokenizeConfig(num_words=num_words), bydate, data_home=home)
        e = embeddings.fn(EmbeddingsConfig(), t, vectors, data_home=home)
        stats = json.loads((store.local_dir(e) / "coverage.json").read_text())
        coverage[str(num_words)] = {**{k: stats[k] for k in ("vocab_size", "hits", "misses", "hit_rate_types", "hit_rate_tokens")},
                                    "distinct_train_words": store.read_manifest(t)["distinct_train_words"],
                                    "top_missing_10": [m["token"] for m in stats["top_missing"][:10]]}
    results["coverage_bydate_glove50"] = coverage

    n, k, e = results["news20_all_texts"], results["news20_task"], results["embeddings_bydate_20000"]
    print(f"news20, all {n['documents']:,} texts (latin-1, text-mode newlines, headers kept):")
    print(f"  distinct words  keras {n['distinct_words_keras']:,}  ours {n['distinct_words_ours']:,}  "
          f"same top-20,000 {n['same_top_20000']}  same sequences {n['same_sequences']}")
    for label, count in n["distinct_words_by_text_variant"].items():
        print(f"    {count:>9,}  {label}")
    print(f"{'step':52s} {'recipe s':>9s} {'ours s':>9s} {'ratio':>8s}")
    rows = [("tokenize all texts (fit + sequences, in memory)", n["keras_fit_plus_sequences_s"], n["ours_s"]),
            ("tokenize task news20 (train fit, Parquet in/out)", k["keras_s"], k["task_s"]),
            ("embedding matrix 20,000 x 50 (dict loop vs join)", e["recipe_matrix_loop_s"], e["ours_matrix_s"]),
            ("GloVe parse + loop vs embeddings task", e["recipe_glove_parse_s"] + e["recipe_matrix_loop_s"], e["ours_task_s"]),
            ("GloVe parse vs warm reload tokens + matrix", e["recipe_glove_parse_s"], e["warm_reload_tokens_plus_matrix_s"])]
    for label, recipe_s, ours in rows:
        print(f"{label:52s} {recipe_s:9.3f} {ours:9.4f} {recipe_s / ours:7.1f}x")
    print(f"task parity with Keras (fit on train, sequences of all): vocab {k['same_vocab_as_keras_on_train']}, "
          f"sequences {k['same_sequences_as_keras']}; matrix equals recipe's {e['same_matrix_as_recipe_with_zero_misses']}")
    for num_words, c in coverage.items():
        print(f"coverage bydate train vocab (num_words={num_words}): {c['hits']:,}/{c['vocab_size']:,} types "
              f"{c['hit_rate_types']:.2%}, tokens {c['hit_rate_tokens']:.2%}; missing e.g. {c['top_missing_10'][:5]}")
    out = REPO / "benchmarks" / "results" / "bench_tokenize.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
