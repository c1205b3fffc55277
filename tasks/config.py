"""The one typed configuration. Frozen pydantic models; each step receives only its own part.

Every URL and checksum can be overridden from a config file, `key=value` on the command
line, or the environment (NEWSGROUPS_LSTM_<SOURCE>_URL / _SHA256, for air-gapped mirrors);
build_config() stacks those layers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from storage.errors import UsageError

# Strict scalars: a config value is never coerced. `train.epochs=true` or "3" is refused rather than read as 1 or 3,
# a float must be finite, and sizes and counts are bounded (JSON and TOML give ints as ints, floats as floats).
Count = Annotated[int, Field(strict=True, ge=1)]  # sizes, counts, batch sizes: at least 1
NonNegative = Annotated[int, Field(strict=True, ge=0)]
Seed = Annotated[int, Field(strict=True, ge=0, lt=2**32)]  # what numpy and Keras accept
Real = Annotated[float, Field(strict=True, allow_inf_nan=False)]  # an int is accepted, a bool or a string is not
Fraction = Annotated[Real, Field(gt=0, lt=1)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Source(_Frozen):
    """One downloadable file. sha256=None means 'record what was seen' (unpinned mirror)."""

    url: str = Field(min_length=1, description="Where to get the file: http(s)://, file:// or a local path.")
    sha256: Sha256 | None = Field(None, description="Expected SHA-256 (hex). Empty: accept what the URL serves and "
                                                    "record its sha256 in the manifest (fetched once per data home).")
    size: Count | None = Field(None, description="Expected size in bytes, if known (a download larger than this fails).")
    mirrors: tuple[str, ...] = Field((), description="Other URLs of the same file, tried in order when `url` fails "
                                                     "permanently or keeps failing.")
    filename: str | None = Field(None, description="Name of the stored file. Empty: the last path component of the URL.")

    @property
    def name(self) -> str:
        return self.filename or self.url.rstrip("/").rsplit("/", 1)[-1]


GLOVE_6B = Source(
    url="https://nlp.stanford.edu/data/glove.6B.zip",
    mirrors=("https://huggingface.co/stanfordnlp/glove/resolve/main/glove.6B.zip",),
    sha256="617afb2fe6cbd085c235baf7a465b96f4112bd7f7ccb2b2cbd649fed9cbcf2fb",
    size=862_182_613,
)
NEWS20_BYDATE = Source(
    url="http://qwone.com/~jason/20Newsgroups/20news-bydate.tar.gz",
    mirrors=("https://ndownloader.figshare.com/files/5975967",),
    sha256="8f1b2514ca22a5ade8fbb9cfa5727df95fa587f4c87b786e15c759fa66d95610",
    filename="20news-bydate.tar.gz",
)
NEWS20_ORIGINAL = Source(  # the 19,997-message collection the original recipe used
    url="http://www.cs.cmu.edu/afs/cs.cmu.edu/project/theo-20/www/data/news20.tar.gz",
    filename="news20.tar.gz",
)
CORPORA = {"bydate": NEWS20_BYDATE, "news20": NEWS20_ORIGINAL}


class SourcesConfig(_Frozen):
    """The two downloads. NEWSGROUPS_LSTM_GLOVE_URL/_SHA256 and NEWSGROUPS_LSTM_CORPUS_URL/_SHA256 in the
    environment where the flow runs override them."""

    corpus: Literal["bydate", "news20"] = Field(
        "bydate", description="Which 20 Newsgroups collection: bydate (18,846 messages, split by date into train and "
                              "test) or news20 (the 19,997-message original; a random test_fraction is held out).")
    glove: Source = Field(GLOVE_6B, description="The GloVe 6B archive (glove.6B.zip with the 50/100/200/300-d files).")
    corpus_source: Source | None = Field(None, description="Replaces the built-in source of `corpus` (a mirror or a "
                                                           "local copy). Empty: the published archive.")

    @property
    def corpus_file(self) -> Source:
        return self.corpus_source or CORPORA[self.corpus]


class CorpusConfig(_Frozen):
    """Reading the newsgroup messages into documents.parquet."""

    strip: tuple[Literal["headers", "footers", "quotes"], ...] = Field(
        (), description="Parts of each message to remove, like scikit-learn's fetch_20newsgroups(remove=...): headers, "
                        "footers (signature blocks), quotes (quoted replies). Empty: the messages as distributed.")
    test_fraction: Fraction = Field(0.2, description="Share of the documents held out for testing, only for a corpus "
                                                     "without its own test split (news20).")
    seed: Seed = Field(1337, description="Seed of that random test split.")
    max_extracted_bytes: Count = Field(2 * 1024**3, description="Refuse an archive whose members unpack to more than "
                                                                "this many bytes together (decompression bombs).")
    # The largest 20news-bydate / news20 message is 160,616 bytes.
    max_document_bytes: Count = Field(1024**2, description="Each document keeps at most this many bytes (the rest is "
                                                           "cut, and listed in the manifest), so that one huge member "
                                                           "cannot exhaust memory.")
    # A corpus given as a table (.parquet, .csv, .jsonl): its columns. No split column: a stratified split.
    text_column: str = Field("text", description="Column holding the text, for a corpus given as a table "
                                                  "(.parquet, .csv, .jsonl).")
    label_column: str = Field("label", description="Column holding the label (any string), for a corpus given as a table.")
    split_column: str | None = Field(None, description="Column holding 'train' or 'test', for a corpus given as a table; "
                                                       "none: a stratified random split by test_fraction and seed.")


class GloveConfig(_Frozen):
    """Which GloVe vectors to convert to vectors.parquet."""

    dim: Literal[50, 100, 200, 300] = Field(50, description="Dimension of the GloVe 6B word vectors to use.")


class TokenizeConfig(_Frozen):
    """Turning texts into word ids (the Keras Tokenizer's rules)."""

    num_words: Count = Field(50_000, description="Vocabulary size: the most frequent words of the training split get "
                                                 "ids 1..num_words (0 is padding); rarer words are dropped.")
    lower: StrictBool = Field(True, description="Lower-case the text before splitting it into words.")
    filters: str = Field('!"#$%&()*+,-./:;<=>?@[\\]^_`{|}~\t\n',
                         description="Characters replaced by spaces before splitting on whitespace.")
    max_length: Count = Field(1000, description="Longest sequence kept per document, in words.")
    truncation: Literal["head", "tail", "both"] = Field(
        "head", description="Which words a longer document keeps: head (its first max_length), tail (its last) or both "
                            "(half from each end).")
    split_contractions: StrictBool = Field(
        True, description="Split English contractions as GloVe's tokenizer did (\"don't\" -> \"do n't\", \"it's\" -> "
                           "\"it 's\"): words GloVe has vectors for. false: Keras's Tokenizer exactly.")


class EmbeddingsConfig(_Frozen):
    """The embedding matrix: one GloVe vector per vocabulary id."""

    oov_init: Literal["zeros", "normal"] = Field(
        "normal", description="Rows of words GloVe does not know: zeros, or random normal with GloVe's own spread.")
    seed: Seed = Field(1337, description="Seed of those random rows.")


class TrainConfig(_Frozen):
    """Model and training. The defaults are the `default` preset (best accuracy); the `seed` preset (TRAIN_PRESETS)
    sets the original recipe's values."""

    preset: Literal["default", "seed"] = Field(
        "default", description="Label of the preset these values came from (set by --preset; changing it alone "
                               "changes nothing else).")
    architecture: Literal["lstm_pool", "bilstm_pool", "lstm_last"] = Field(
        "lstm_pool", description="lstm_pool: one LSTM, masked max+mean pooling of its outputs over time; bilstm_pool: "
                                 "the same read in both directions (about 2x the time per epoch on CPU, no better on "
                                 "20 Newsgroups); lstm_last: one LSTM read up to each document's last token (the "
                                 "original recipe, without its Dense(1) bottleneck).")
    lstm_units: Count = Field(96, description="Units of the LSTM (per direction).")
    lstm_max_tokens: Count | None = Field(400, description="The LSTM reads each document's first N tokens; the bag of "
                                                           "words reads all. Empty: all tokens.")
    lstm_stride: Count = Field(2, description="Word vectors concatenated per LSTM step: 2 = word pairs, half the "
                                              "sequential steps.")
    attention_pool: StrictBool = Field(False, description="Also an attention-weighted sum of the LSTM outputs, next to "
                                                          "their max and mean (lstm_pool, bilstm_pool).")
    swem_expert: StrictBool = Field(False, description="Add an expert on the masked max+mean of the word vectors "
                                                       "(SWEM); it got expert weight 0 on every 20 Newsgroups run.")
    bow_expert: StrictBool = Field(True, description="Add a linear bag-of-words expert (per-word class scores over "
                                                     "sublinear tf-idf, trained from zero).")
    embedding_dropout: Real = Field(0.2, ge=0, lt=1, description="Share of embedding channels dropped in training (the "
                                                                 "recipe's input dropout).")
    dropout: Real = Field(0.3, ge=0, lt=1, description="Dropout before the classifier.")
    lstm_label_smoothing: Real = Field(0.0, ge=0, lt=1, description="Label smoothing of the LSTM expert's own loss: "
                                                                    "this share of its target spread over all classes.")
    unfreeze_embeddings_after: NonNegative | None = Field(1, description="Epochs with the GloVe vectors frozen, after "
                                                                         "which they are trained too. Empty: frozen "
                                                                         "throughout.")
    epochs: Count = Field(20, description="Most passes over the training documents; early stopping may end training "
                                          "sooner (see patience).")
    batch_size: Count = Field(64, description="Documents per training batch (lower it if the GPU runs out of memory).")
    learning_rate: Real = Field(5e-3, gt=0, description="Adam's (initial) learning rate.")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "cosine", description="constant, or cosine decay to 5% of learning_rate over all epochs.")
    validation_fraction: Fraction = Field(0.1, description="Slice of the TRAIN split held out to fit the expert weights "
                                                           "and for early stopping.")
    validation: Literal["latest", "random"] = Field(
        "latest", description="Which slice: latest = each group's latest posts (highest article numbers, or the last "
                              "rows of a table), like 20news-bydate's later test split; random = a seeded random one.")
    refit: StrictBool = Field(True, description="After training, train again on all training documents (the "
                                                "validation slice too) for the best epoch's number of epochs: the "
                                                "latest posts, nearest to a later test split, are learned too.")
    refit_members: Count = Field(3, description="Models the refit trains (each with its own seed; the first with "
                                                "`seed`), whose experts are averaged (geometric mean): an ensemble "
                                                "that costs one refit more per member. 1: a single refit model.")
    patience: NonNegative = Field(5, description="Epochs tolerated without a lower validation loss (of the product of "
                                                 "experts) before training stops; the best epoch's weights are kept.")
    seed: Seed = Field(1337, description="Seed of the weights, the validation slice and the batch order.")


# The original recipe: 20,000 words, 1,000 tokens, frozen GloVe, LSTM(100), input dropout 0.2,
# Adam, 5 epochs, batch 32 (minus its Dense(1)+sigmoid bottleneck and the cuDNN-blocking recurrent_dropout).
TRAIN_PRESETS: dict[str, dict] = {
    "default": {},
    "seed": dict(
        architecture="lstm_last", lstm_units=100, lstm_max_tokens=None, lstm_stride=1, swem_expert=False, bow_expert=False,
        embedding_dropout=0.2, dropout=0.0, unfreeze_embeddings_after=None, epochs=5, batch_size=32,
        learning_rate=1e-3, lr_schedule="constant", patience=5, attention_pool=False, lstm_label_smoothing=0.0, refit=False,
    ),
}
TOKENIZE_PRESETS: dict[str, dict] = {
    "default": {name: TokenizeConfig.model_fields[name].default
                for name in ("num_words", "max_length", "truncation", "split_contractions")},
    # pad_sequences' default keeps the end; Keras's Tokenizer keeps contractions whole
    "seed": dict(num_words=20_000, max_length=1000, truncation="tail", split_contractions=False),
}


class EvaluateConfig(_Frozen):
    """Scoring the trained model on the test split."""

    batch_size: Count = Field(256, description="Documents per prediction batch.")


class ParallelConfig(_Frozen):
    """How the shards of a step run. No artifact key depends on it: the artifacts are the same however they ran."""

    shards: int = Field(0, ge=0, strict=True, description="Tokenize shards, cut by row groups of documents.parquet; "
                                                          "0: one per CPU core of the machine running the flow.")
    task_runner: str = Field("threads", description="How the shards run: 'threads' (Prefect's ThreadPoolTaskRunner; "
                                                    "Arrow releases the GIL), 'processes' (ProcessPoolTaskRunner), or the "
                                                    "import path of any Prefect task runner class, e.g. "
                                                    "'prefect_dask.DaskTaskRunner'.")
    options: dict[str, Any] = Field({}, description="Keyword arguments of that task runner class, e.g. "
                                                    "{\"address\": \"tcp://scheduler:8786\"}.")


class PipelineConfig(_Frozen):
    """Everything a run depends on; each step receives only its own part, and its artifact key hashes that part.
    (The sections' descriptions are their classes' docstrings.)"""

    data_home: str | None = Field(None, description="Where the artifacts are kept: a directory or an object-store URI "
                                                    "(s3://bucket/prefix). Empty: $NEWSGROUPS_LSTM_HOME, else "
                                                    "~/.cache/newsgroups-lstm.")
    sources: SourcesConfig = SourcesConfig()
    corpus: CorpusConfig = CorpusConfig()
    glove: GloveConfig = GloveConfig()
    tokenize: TokenizeConfig = TokenizeConfig()
    embeddings: EmbeddingsConfig = EmbeddingsConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    parallel: ParallelConfig = ParallelConfig()


def with_preset(cfg: PipelineConfig, name: str) -> PipelineConfig:
    """`cfg` with the training preset `name` applied (and the tokenizer settings that preset needs)."""
    if name not in TRAIN_PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(TRAIN_PRESETS)}")
    train = TrainConfig(**{**TrainConfig().model_dump(), "seed": cfg.train.seed, **TRAIN_PRESETS[name], "preset": name})
    tokenize = cfg.tokenize.model_copy(update=TOKENIZE_PRESETS[name])
    return cfg.model_copy(update={"train": train, "tokenize": tokenize})


def source_from_env(name: str, source: Source, environ: Mapping[str, str] = os.environ) -> Source:
    """Apply NEWSGROUPS_LSTM_<NAME>_URL / _SHA256 overrides. A new URL without a new sha256 is unpinned."""
    prefix = f"NEWSGROUPS_LSTM_{name.upper()}"
    url, sha = environ.get(f"{prefix}_URL"), environ.get(f"{prefix}_SHA256")
    if not url and not sha:
        return source
    changes: dict = {}
    if url:
        changes.update(url=url, mirrors=(), size=None, sha256=None, filename=source.name)
    if sha:
        changes["sha256"] = sha.lower()
    try:
        return Source.model_validate({**source.model_dump(), **changes})
    except ValidationError as exc:
        raise UsageError(f"{prefix}_URL / {prefix}_SHA256: {_problems(exc)}") from None


def with_source_env(config: PipelineConfig, environ: Mapping[str, str] = os.environ) -> PipelineConfig:
    """`config` with the NEWSGROUPS_LSTM_GLOVE_/CORPUS_ URL/SHA256 overrides of `environ` (read where the flow runs)."""
    sources = config.sources
    glove = source_from_env("glove", sources.glove, environ)
    corpus = source_from_env("corpus", sources.corpus_file, environ)
    if glove == sources.glove and corpus == sources.corpus_file:
        return config
    corpus_source = corpus if corpus != sources.corpus_file else sources.corpus_source
    return config.model_copy(update={"sources": sources.model_copy(update={"glove": glove, "corpus_source": corpus_source})})


# -- building a config from layers: preset < files < key=value < --data-home --------------------------
def field_annotation(path: Sequence[str]) -> Any:
    """The type annotation of a dotted PipelineConfig field, or None if the path is not a field."""
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
    if isinstance(value, str) and get_origin(field_annotation(path)) in (tuple, list):
        value = [v.strip() for v in value.split(",") if v.strip()]
    return path, value


def merge(base: dict, extra: Mapping) -> dict:
    """Deep-merge `extra` into `base` (sub-tables merge, other values replace)."""
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


def build_config(layers: Sequence[Mapping], overrides: Sequence[str] = (), preset: str | None = None,
                 data_home: str | None = None) -> PipelineConfig:
    """PipelineConfig from, in increasing precedence: defaults, preset, `layers` (parsed config files), key=value,
    data_home. Raises UsageError naming the field for anything invalid."""
    data: dict = with_preset(PipelineConfig(), preset).model_dump(mode="json") if preset else {}
    for layer in layers:
        merge(data, layer)
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
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise UsageError(f"invalid configuration: {_problems(exc)}") from None


def _problems(exc: ValidationError) -> str:
    """Each problem as `dotted.field: message (got <value>)`."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}"
                     + (f" (got {e['input']!r})" if not isinstance(e.get("input"), (dict, list)) else "")
                     for e in exc.errors())
