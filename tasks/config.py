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

    url: str = Field(min_length=1)
    sha256: Sha256 | None = None
    size: Count | None = None
    mirrors: tuple[str, ...] = ()  # tried in order when `url` fails permanently or keeps failing
    filename: str | None = None  # defaults to the last path component of the URL

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
    corpus: Literal["bydate", "news20"] = "bydate"
    glove: Source = GLOVE_6B
    corpus_source: Source | None = None  # overrides the built-in source of `corpus`

    @property
    def corpus_file(self) -> Source:
        return self.corpus_source or CORPORA[self.corpus]


class CorpusConfig(_Frozen):
    strip: tuple[Literal["headers", "footers", "quotes"], ...] = ()  # like sklearn's remove=
    test_fraction: Fraction = 0.2  # only for corpora without a test split
    seed: Seed = 1337
    max_extracted_bytes: Count = 2 * 1024**3  # all members together (decompression bombs)
    # Each document keeps at most this many bytes (the rest is cut, and listed in the manifest), so one
    # huge member cannot exhaust memory. The largest 20news-bydate / news20 message is 160,616 bytes.
    max_document_bytes: Count = 1024**2


class GloveConfig(_Frozen):
    dim: Literal[50, 100, 200, 300] = 50


class TokenizeConfig(_Frozen):
    num_words: Count = 50_000  # vocabulary size (ids 1..num_words; 0 = padding)
    lower: StrictBool = True
    filters: str = '!"#$%&()*+,-./:;<=>?@[\\]^_`{|}~\t\n'
    max_length: Count = 1000
    truncation: Literal["head", "tail", "both"] = "head"


class EmbeddingsConfig(_Frozen):
    oov_init: Literal["zeros", "normal"] = "normal"  # rows of words GloVe does not know
    seed: Seed = 1337


class TrainConfig(_Frozen):
    """Model and training. The field defaults ARE the `default` preset; `seed` is in TRAIN_PRESETS."""

    preset: Literal["default", "seed"] = "default"  # which preset these fields came from (a label)
    # lstm_pool: one LSTM, masked max+mean pooling of its outputs over time;
    # bilstm_pool: the same read in both directions (about 2x the time per epoch on CPU, no better on 20NG);
    # lstm_last: one LSTM read up to each document's last token (the original recipe, no Dense(1) bottleneck)
    architecture: Literal["lstm_pool", "bilstm_pool", "lstm_last"] = "lstm_pool"
    lstm_units: Count = 96
    lstm_max_tokens: Count | None = 400  # the LSTM reads the first N tokens; the bag of words reads all
    lstm_stride: Count = 2  # word vectors concatenated per LSTM step: 2 = word pairs, half the steps
    swem_expert: StrictBool = False  # masked max+mean of the word vectors (SWEM); got expert weight 0 on every 20NG run
    bow_expert: StrictBool = True  # a linear bag-of-words expert (per-word class scores, trained from zero)
    embedding_dropout: Real = Field(0.2, ge=0, lt=1)  # drops whole embedding channels (the recipe's input dropout)
    dropout: Real = Field(0.3, ge=0, lt=1)  # before the classifier
    unfreeze_embeddings_after: NonNegative | None = 1  # epochs of frozen GloVe; None = frozen throughout
    epochs: Count = 20
    batch_size: Count = 64
    learning_rate: Real = Field(3e-3, gt=0)
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    validation_fraction: Fraction = 0.1  # slice of the TRAIN split for early stopping
    patience: NonNegative = 5  # epochs tolerated without a lower validation loss (of the product of experts)
    seed: Seed = 1337


# The original recipe: 20,000 words, 1,000 tokens, frozen GloVe, LSTM(100), input dropout 0.2,
# Adam, 5 epochs, batch 32 (minus its Dense(1)+sigmoid bottleneck and the cuDNN-blocking recurrent_dropout).
TRAIN_PRESETS: dict[str, dict] = {
    "default": {},
    "seed": dict(
        architecture="lstm_last", lstm_units=100, lstm_max_tokens=None, lstm_stride=1, swem_expert=False, bow_expert=False,
        embedding_dropout=0.2, dropout=0.0, unfreeze_embeddings_after=None, epochs=5, batch_size=32,
        learning_rate=1e-3, lr_schedule="constant", patience=5,
    ),
}
TOKENIZE_PRESETS: dict[str, dict] = {
    "default": {name: TokenizeConfig.model_fields[name].default for name in ("num_words", "max_length", "truncation")},
    "seed": dict(num_words=20_000, max_length=1000, truncation="tail"),  # pad_sequences' default keeps the end
}


class EvaluateConfig(_Frozen):
    batch_size: Count = 256  # documents per prediction batch


class PipelineConfig(_Frozen):
    data_home: str | None = None  # default: $NEWSGROUPS_LSTM_HOME or ~/.cache/newsgroups-lstm
    sources: SourcesConfig = SourcesConfig()
    corpus: CorpusConfig = CorpusConfig()
    glove: GloveConfig = GloveConfig()
    tokenize: TokenizeConfig = TokenizeConfig()
    embeddings: EmbeddingsConfig = EmbeddingsConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()


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
