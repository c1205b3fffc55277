import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tasks.tokenizer as tok
import tasks.tokens as tokens_step
from storage.artifacts import ArtifactRef, ArtifactStore
from storage.schemas import DOCUMENTS, SEQUENCES, VOCAB
from tasks import embeddings as embeddings_step
from tasks.config import TokenizeConfig

# Hand-written strings where a naive tokenizer would differ from Keras's.
TRICKY = [
    "Hello, World! Hello again... (hello)",
    "don't stop: it's 3.14 or 1,000 -- 2nd_place #1 @user e-mail foo/bar a+b=c",
    "a  b\t\tc\r\nd\x0be\x0cf\xa0g\u2003h\u3000i",  # only " ", \t, \n separate; \r \x0b \x0c \xa0 U+2003 do not
    "ÜBER Straße ΣΑΣ ΟΔΟΣ İstanbul ǅemal ﬁne Ω K caf\u00e9 cafe\u0301 it\u2019s \u201cquoted\u201d",
    "",
    "!!! ... ??? ---",
    "   leading and trailing   ",
    "tab\tseparated\nlines\n\nand\x00nul 12345 ١٢٣ 😀smile",
]


def documents(rows):
    """DOCUMENTS table from (split, text) pairs; label = row index % 3."""
    return pa.table(
        {
            "doc_id": [f"{s}/g/{i}" for i, (s, _) in enumerate(rows)],
            "group": ["g"] * len(rows),
            "label": pa.array([i % 3 for i in range(len(rows))], pa.int16()),
            "split": [s for s, _ in rows],
            "text": [t for _, t in rows],
        },
        schema=DOCUMENTS,
    )


def publish_corpus(home, rows, key="c1") -> ArtifactRef:
    table = documents(rows)
    return ArtifactStore(home).publish(
        "corpus", key, build=lambda d: {"rows": d.write_parquet("documents.parquet", table, DOCUMENTS)}, version=1, params={}
    )


def read(ref: ArtifactRef, home):
    store = ArtifactStore(home)
    return store.read_parquet(ref, "vocab.parquet", VOCAB), store.read_parquet(ref, "sequences.parquet", SEQUENCES)


@pytest.fixture(scope="module")
def keras_text():
    return pytest.importorskip("tf_keras").preprocessing.text


def test_words_match_keras_text_to_word_sequence(keras_text):
    ours = tok.split_words(TRICKY, tok.Rules()).to_pylist()
    assert ours == [keras_text.text_to_word_sequence(t) for t in TRICKY]
    upper = tok.split_words(TRICKY, tok.Rules(lower=False, filters="!,.")).to_pylist()
    assert upper == [keras_text.text_to_word_sequence(t, filters="!,.", lower=False) for t in TRICKY]


def test_vocabulary_and_ids_match_keras_tokenizer(keras_text):
    texts = TRICKY + ["the cat the dog", "dog cat bird the", "zeta alpha zeta alpha beta"]  # ties broken by first occurrence
    keras = keras_text.Tokenizer(num_words=6)  # Keras keeps num_words - 1 words
    keras.fit_on_texts(texts)
    vocab, distinct = tok.fit_vocabulary([pa.array(texts)], tok.Rules(), num_words=5)
    assert distinct == len(keras.word_index)
    assert vocab["token"].to_pylist() == [w for w, _ in sorted(keras.word_index.items(), key=lambda kv: kv[1])][:5]
    assert vocab["id"].to_pylist() == [1, 2, 3, 4, 5]
    assert tok.texts_to_ids(texts, vocab, tok.Rules()).to_pylist() == keras.texts_to_sequences(texts)
    full, _ = tok.fit_vocabulary([pa.array(texts)], tok.Rules(), num_words=10**6)
    assert dict(zip(full["token"].to_pylist(), full["id"].to_pylist())) == keras.word_index
    assert dict(zip(full["token"].to_pylist(), full["count"].to_pylist())) == dict(keras.word_counts)


def test_split_contractions_splits_them_as_glove_does_and_keeps_everything_else():
    text = "Don't worry: it's what I've got, can't WON'T... o'clock God's 'quoted' rock'n'roll they'd we'll you're"
    split = tok.split_words([text], tok.Rules(split_contractions=True)).to_pylist()[0]
    assert split == ["do", "n't", "worry", "it", "'s", "what", "i", "'ve", "got", "ca", "n't", "wo", "n't", "o'clock",
                     "god", "'s", "'quoted'", "rock'n'roll", "they", "'d", "we", "'ll", "you", "'re"]
    kept = tok.split_words([text], tok.Rules()).to_pylist()[0]
    assert kept[:2] == ["don't", "worry"] and len(kept) == 15  # Keras parity: apostrophes stay inside words


def test_non_ascii_lowercase_follows_python_str_lower():
    texts = ["ΣΑΣ ΟΔΟΣ", "İ", "ABC Ünïcödé"]
    assert tok.split_words(texts, tok.Rules()).to_pylist() == [t.lower().split() for t in texts]
    assert tok.split_words(texts, tok.Rules()).to_pylist()[0] == ["σας", "οδος"]  # final sigma


def test_multibyte_filter_characters_split_words():
    rules = tok.Rules(filters="’“”.")
    assert tok.split_words(["it’s “fine”. ok"], rules).to_pylist() == [["it", "s", "fine", "ok"]]


def test_vocabulary_comes_from_training_split_only(home):
    corpus = publish_corpus(home, [("train", "apple banana apple"), ("test", "apple cherry cherry cherry")])
    ref = tokens_step.tokens.fn(TokenizeConfig(num_words=100), corpus, data_home=home)
    vocab, sequences = read(ref, home)
    assert vocab.to_pylist() == [{"token": "apple", "id": 1, "count": 2}, {"token": "banana", "id": 2, "count": 1}]
    assert sequences["ids"].to_pylist() == [[1, 2, 1], [1]]  # "cherry" is OOV: dropped
    assert sequences["length"].to_pylist() == [3, 1]
    assert sequences.select(["doc_id", "label", "split"]).to_pylist() == documents(
        [("train", ""), ("test", "")]).select(["doc_id", "label", "split"]).to_pylist()
    rules = json.loads((Path(ref.uri) / "tokenizer.json").read_text())
    assert rules["oov"] == "drop" and rules["fit_on"] == "train" and rules["vocab_size"] == 2
    assert ArtifactStore(home).read_manifest(ref)["distinct_train_words"] == 2


def test_vocab_larger_than_distinct_words_empty_and_punctuation_only_documents(home):
    rows = [("train", "b a b"), ("train", ""), ("train", "?!... ,,, ---"), ("test", "")]
    ref = tokens_step.tokens.fn(TokenizeConfig(num_words=50_000), publish_corpus(home, rows), data_home=home)
    vocab, sequences = read(ref, home)
    assert vocab["token"].to_pylist() == ["b", "a"]
    assert sequences["ids"].to_pylist() == [[1, 2, 1], [], [], []]
    assert sequences["length"].to_pylist() == [3, 0, 0, 0]
    assert ref.rows == 4


def test_no_training_words_is_an_input_error(home):
    from storage.errors import InputFormatError

    with pytest.raises(InputFormatError, match="train"):
        tokens_step.tokens.fn(TokenizeConfig(), publish_corpus(home, [("train", "..."), ("test", "words")]), data_home=home)


def test_tokenizer_json_and_texts_to_ids_reproduce_stored_sequences(home, monkeypatch):
    rows = [("train" if i % 4 else "test", f"{TRICKY[i % len(TRICKY)]} word{i % 7} extra{i}") for i in range(40)]
    cfg = TokenizeConfig(num_words=12, max_length=5, truncation="both", split_contractions=True)
    ref = tokens_step.tokens.fn(cfg, publish_corpus(home, rows), data_home=home)
    vocab, sequences = read(ref, home)
    rules = json.loads((Path(ref.uri) / "tokenizer.json").read_text())
    assert rules["split_contractions"] is True and "n't" in vocab["token"].to_pylist()
    raw = [t for _, t in rows]
    assert tok.texts_to_ids(raw, vocab, rules).to_pylist() == sequences["ids"].to_pylist()
    as_dict = dict(zip(vocab["token"].to_pylist(), vocab["id"].to_pylist()))
    assert tok.texts_to_ids(raw, as_dict, rules).to_pylist() == sequences["ids"].to_pylist()
    # Record batches of 3 documents give the same artifact bytes as one batch.
    monkeypatch.setattr(tokens_step, "BATCH_ROWS", 3)
    other_home = str(Path(home).parent / "other")
    ref3 = tokens_step.tokens.fn(cfg, publish_corpus(other_home, rows), data_home=other_home)
    assert read(ref3, other_home)[0].equals(vocab) and read(ref3, other_home)[1].equals(sequences)


@pytest.mark.parametrize(
    "truncation, expected",
    [("head", [[1, 2, 3, 4], [1, 2], []]), ("tail", [[3, 4, 5, 6], [1, 2], []]), ("both", [[1, 2, 5, 6], [1, 2], []])],
)
def test_truncation_modes_keep_the_named_part(truncation, expected):
    vocab = {w: i for i, w in enumerate("abcdef", start=1)}
    rules = tok.Rules(max_length=4, truncation=truncation)
    words = tok.split_words(["a b c d e f", "a b", ""], rules)
    ids, lengths = tok.encode(words, vocab, rules)
    assert ids.to_pylist() == expected
    assert lengths.to_pylist() == [6, 2, 0]


def test_both_with_odd_length_keeps_one_more_from_the_head():
    ids = tok.texts_to_ids(["a b c d e f"], {w: i for i, w in enumerate("abcdef", 1)}, {"filters": "", "max_length": 3, "truncation": "both"})
    assert ids.to_pylist() == [[1, 2, 6]]


_IDS_SCRIPT = """
import json, sys, pyarrow as pa
from tasks.tokenizer import Rules, fit_vocabulary
texts = json.loads(sys.stdin.read())
vocab, _ = fit_vocabulary([pa.array(texts[:3]), pa.array(texts[3:])], Rules(), 8)
print(json.dumps(vocab.to_pylist()))
"""


def test_ids_are_deterministic_across_processes():
    # Many ties: every ordering decision rests on the tie rule, not on hashing.
    texts = ["q w e r t y", "y t r e w q", "a s d f", "f d s a z", "x c v b", "n m"]
    runs = []
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", _IDS_SCRIPT], input=json.dumps(texts), capture_output=True, text=True, check=True,
            env={"PYTHONHASHSEED": seed, "PATH": ""}, cwd=Path(__file__).resolve().parents[2],
        )
        runs.append(json.loads(out.stdout))
    here, _ = tok.fit_vocabulary([pa.array(texts)], tok.Rules(), 8)
    assert runs[0] == runs[1] == here.to_pylist()
    assert [r["token"] for r in runs[0]] == ["q", "w", "e", "r", "t", "y", "a", "s"]


def test_cache_keys_change_exactly_when_they_should(home):
    corpus = ArtifactRef(step="corpus", key="c1", uri="x")
    vectors = ArtifactRef(step="glove", key="g1", uri="y")
    base = TokenizeConfig()
    assert tokens_step.STEP.key(base, [corpus]) == tokens_step.STEP.key(TokenizeConfig(), [corpus])
    changed = {tokens_step.STEP.key(base.model_copy(update=u), [corpus]) for u in (
        {"num_words": 20_000}, {"lower": False}, {"filters": "!"}, {"max_length": 500}, {"truncation": "tail"})}
    assert len(changed | {tokens_step.STEP.key(base, [corpus])}) == 6
    assert tokens_step.STEP.key(base, [corpus]) != tokens_step.STEP.key(base, [corpus.model_copy(update={"key": "c2"})])
    # Only num_words changed: tokens get a new key, so do embeddings (upstream); corpus/glove keys are untouched.
    from tasks.config import EmbeddingsConfig

    t1 = ArtifactRef(step="tokens", key=tokens_step.STEP.key(base, [corpus]), uri="t1")
    t2 = ArtifactRef(step="tokens", key=tokens_step.STEP.key(base.model_copy(update={"num_words": 20_000}), [corpus]), uri="t2")
    assert embeddings_step.STEP.key(EmbeddingsConfig(), [t1, vectors]) != embeddings_step.STEP.key(EmbeddingsConfig(), [t2, vectors])
    assert embeddings_step.STEP.key(EmbeddingsConfig(), [t1, vectors]) == embeddings_step.STEP.key(EmbeddingsConfig(), [t1.model_copy(update={"uri": "z"}), vectors])


def test_same_inputs_reuse_the_artifact(home):
    corpus = publish_corpus(home, [("train", "x y z"), ("test", "z")])
    first = tokens_step.tokens.fn(TokenizeConfig(num_words=2), corpus, data_home=home)
    manifest = ArtifactStore(home).read_manifest(first)
    second = tokens_step.tokens.fn(TokenizeConfig(num_words=2), corpus, data_home=home)
    assert second == first and ArtifactStore(home).read_manifest(second)["created"] == manifest["created"]
    assert manifest["params"]["num_words"] == 2 and manifest["upstream"][0]["key"] == corpus.key
    assert set(manifest["files"]) == {"vocab.parquet", "sequences.parquet", "tokenizer.json"}
    assert pq.read_schema(Path(first.uri) / "sequences.parquet").equals(SEQUENCES)
    third = tokens_step.tokens.fn(TokenizeConfig(num_words=3), corpus, data_home=home)
    assert third.key != first.key
    assert not list(Path(home, "tokens").glob(".tmp-*"))  # no staging directory is left behind


def test_split_words_accepts_chunked_sliced_and_null_texts():
    chunked = pa.chunked_array([["A b", None], ["c, D"]])
    assert tok.split_words(chunked, tok.Rules()).to_pylist() == [["a", "b"], [], ["c", "d"]]
    sliced = pa.array(["zz", "Hello there", "x"]).slice(1, 2)
    assert tok.split_words(sliced, tok.Rules()).to_pylist() == [["hello", "there"], ["x"]]
    assert np.array_equal(tok.split_words(pa.array([], pa.string()), tok.Rules()).offsets.to_numpy(), [0])
