"""Step "corpus": a folder-per-label archive -> documents.parquet (doc_id, group, label, split, text).

Layouts (found from the member paths, so any folder-per-label corpus works):
- split: `[<top>/]<name>-train/<group>/<file>` next to `<name>-test/<group>/<file>` (20news-bydate);
  a folder is a split root when its name is or ends in train/test (after -, _ or .).
- folders: `[<top>/]<group>/<file>` (the 19,997-message news20.tar.gz); the root is the folder
  holding the most documents two levels down. Such a corpus gets a seeded, stratified
  train/test split (CorpusConfig.test_fraction, seed).
Rules: a document is a regular file directly inside a class folder. Everything else (files
next to the class folders such as README, files in nested folders, hidden names like
.DS_Store) is ignored and counted in the manifest. A class folder without documents is an
error (InputFormatError naming it): silently dropping it would shift every label after it.
Labels are indices into the sorted group names; the label map is in the manifest. Text is
UTF-8, falling back to latin-1 (which cannot fail) per document, counted. Empty documents are
kept and counted. Archive members are read straight from the archive, never extracted, and
at most CorpusConfig.max_document_bytes of each is kept: a longer document is cut there, and
the manifest lists it (truncated_documents, truncated_examples: doc_id -> full size). Member
names are percent-escaped by storage.archives.escape_name, so doc_id and group never hold a
raw control character or an undecodable byte.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from storage.archives import Member, iter_archive
from storage.artifacts import ArtifactRef, ArtifactStore
from storage.download import forget_download
from storage.errors import InputFormatError, Interrupted, PipelineError
from storage.files import Staging
from storage.schemas import DOCUMENTS
from tasks.config import CorpusConfig
from tasks.step import Step, step_logger

# -- text cleaning: the semantics of sklearn's fetch_20newsgroups(remove=...) --------------------
_QUOTE_RE = re.compile(r"(writes in|writes:|wrote:|says:|said:|^In article|^Quoted from|^\||^>)")


def strip_headers(text: str) -> str:
    """Drop everything up to the first blank line (the message headers)."""
    _before, _blank, after = text.partition("\n\n")
    return after


def strip_quotes(text: str) -> str:
    """Drop quoted lines and attribution lines ("In article ... writes:")."""
    return "\n".join(line for line in text.split("\n") if not _QUOTE_RE.search(line))


def strip_footer(text: str) -> str:
    """Drop the signature block: everything after the last line made only of dashes/blanks."""
    lines = text.strip().split("\n")
    for line_num in range(len(lines) - 1, -1, -1):
        if lines[line_num].strip().strip("-") == "":
            break
    return "\n".join(lines[:line_num]) if line_num > 0 else text


def clean_text(text: str, strip: Iterable[str]) -> str:
    """Apply the requested strippers in sklearn's order: headers, footers, quotes."""
    strip = set(strip)
    if "headers" in strip:
        text = strip_headers(text)
    if "footers" in strip:
        text = strip_footer(text)
    if "quotes" in strip:
        text = strip_quotes(text)
    return text


def decode_text(data: bytes, cut: bool = False) -> tuple[str, bool]:
    """(text, used_fallback): UTF-8 when valid, else latin-1, which decodes any byte string.

    `cut`: the bytes are a document's first max_document_bytes, so a character split at the
    end is dropped rather than making the whole document latin-1."""
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError as exc:
        if cut and exc.reason == "unexpected end of data" and exc.end == len(data):
            return decode_text(data[: exc.start])
        return data.decode("latin-1"), True


# -- layout ----------------------------------------------------------------------------------------
_SPLIT_RE = re.compile(r"(?:^|[-_.])(train|test)$", re.IGNORECASE)


@dataclass
class Layout:
    kind: str  # "split" or "folders"
    roots: dict[tuple[str, ...], str | None]  # root folder -> split name ("train"/"test") or None
    groups: list[str]
    documents: list[tuple[str | None, str, str, tuple[str, ...]]]  # (split, group, file name, member path)
    ignored: list[str] = field(default_factory=list)


def find_layout(paths: Iterable[str], dirs: Iterable[str] = (), archive: str = "archive") -> Layout:
    """Work out where the class folders are from member paths (files) and directory members."""
    files, ignored = [], []
    for p in paths:
        parts = tuple(p.split("/"))
        if any(x.startswith(".") for x in parts):
            ignored.append(p)
        else:
            files.append(parts)
    dir_parts = [tuple(d.split("/")) for d in dirs if not any(x.startswith(".") for x in d.split("/"))]
    grandparents = Counter(f[:-2] for f in files if len(f) >= 2)
    if not grandparents:
        raise InputFormatError(f"{archive}: no class folders found (expected <group>/<file> members)")

    by_parent: dict[tuple[str, ...], dict[str, tuple[str, ...]]] = {}
    for gp in grandparents:
        if gp and (m := _SPLIT_RE.search(gp[-1])):
            by_parent.setdefault(gp[:-1], {})[m.group(1).lower()] = gp
    split_parents = [parent for parent, splits in by_parent.items() if set(splits) == {"train", "test"}]
    if len(split_parents) > 1:
        raise InputFormatError(f"{archive}: several train/test folder pairs: {sorted('/'.join(p) or '.' for p in split_parents)}")
    if split_parents:
        splits = by_parent[split_parents[0]]
        roots: dict[tuple[str, ...], str | None] = {splits["train"]: "train", splits["test"]: "test"}
        kind = "split"
    else:
        root = sorted(grandparents.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        roots, kind = {root: None}, "folders"

    documents, folders = [], {}
    for root, split in roots.items():
        n = len(root)
        found = {d[n] for d in dir_parts if len(d) > n and d[:n] == root}
        found |= {f[n] for f in files if len(f) > n + 1 and f[:n] == root}
        folders[split] = found
    for f in files:
        split = roots.get(f[:-2], "-") if len(f) >= 2 else "-"
        if split == "-":
            ignored.append("/".join(f))
        else:
            documents.append((split, f[-2], f[-1], f))

    counts = Counter((split, group) for split, group, _, _ in documents)
    for root, split in roots.items():
        for group in sorted(folders[split]):
            if counts[(split, group)] == 0:
                raise InputFormatError(f"{archive}: class folder {'/'.join((*root, group))!r} holds no documents "
                                       "(documents must be files directly inside their class folder)")
    if kind == "split" and folders["train"] != folders["test"]:
        raise InputFormatError(f"{archive}: train and test have different class folders: only in train "
                               f"{sorted(folders['train'] - folders['test'])}, only in test "
                               f"{sorted(folders['test'] - folders['train'])}")
    groups = sorted(set().union(*folders.values()))
    if len(groups) < 2:
        raise InputFormatError(f"{archive}: found {len(groups)} class folder(s) {groups}; a classifier needs at least 2")
    return Layout(kind, roots, groups, documents, sorted(ignored))


def stratified_test_mask(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean test mask: round(n * test_fraction) of each label's rows, chosen by a seeded permutation.

    Rows must already be in a deterministic order; the result depends only on that order and seed.
    """
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        n_test = int(round(len(idx) * test_fraction))
        if len(idx) >= 2:
            n_test = min(max(n_test, 1), len(idx) - 1)  # both splits see every class
        mask[idx[rng.permutation(len(idx))[:n_test]]] = True
    return mask


def build_documents(members: Iterable[Member], cfg: CorpusConfig, archive: str = "archive") -> tuple[pa.Table, dict]:
    """Archive members -> (documents table in DOCUMENTS schema, stats for the manifest)."""
    data: dict[str, bytes] = {}
    dirs, cut = [], {}
    for m in members:
        if m.is_dir:
            dirs.append(m.name)
        else:
            data[m.name] = m.data or b""
            if m.full_size is not None:
                cut[m.name] = m.full_size
    layout = find_layout(data, dirs, archive)
    label_of = {g: i for i, g in enumerate(layout.groups)}
    docs = sorted(layout.documents, key=lambda d: (d[0] or "", d[1], d[2]))

    texts, fallbacks, empty = [], 0, 0
    for _, _, _, path in docs:
        text, fell_back = decode_text(data["/".join(path)], cut="/".join(path) in cut)
        fallbacks += fell_back
        text = clean_text(text, cfg.strip)
        empty += not text.strip()
        texts.append(text)
    labels = np.array([label_of[group] for _, group, _, _ in docs], dtype=np.int16)
    if layout.kind == "split":
        splits = [split for split, _, _, _ in docs]
    else:
        mask = stratified_test_mask(labels, cfg.test_fraction, cfg.seed)
        splits = np.where(mask, "test", "train").tolist()
    doc_ids = [f"{split}/{group}/{name}" for split, (_, group, name, _) in zip(splits, docs)]
    truncated = {doc_id: cut["/".join(path)] for doc_id, (*_, path) in zip(doc_ids, docs) if "/".join(path) in cut}

    table = pa.table(
        {
            "doc_id": pa.array(doc_ids, pa.string()),
            "group": pa.array([group for _, group, _, _ in docs], pa.string()),
            "label": pa.array(labels, pa.int16()),
            "split": pa.array(splits, pa.string()),
            "text": pa.array(texts, pa.string()),
        },
        schema=DOCUMENTS,
    ).sort_by([("split", "ascending"), ("label", "ascending"), ("doc_id", "ascending")])
    per_split = Counter(splits)
    per_group = Counter((group, split) for (_, group, _, _), split in zip(docs, splits))
    stats = {
        "layout": layout.kind,
        "groups": layout.groups,
        "label_map": label_of,
        "split_source": "archive" if layout.kind == "split" else f"stratified(test_fraction={cfg.test_fraction}, seed={cfg.seed})",
        "documents": {s: per_split[s] for s in ("train", "test")},
        "per_group": {g: {s: per_group[(g, s)] for s in ("train", "test")} for g in layout.groups},
        "latin1_fallbacks": fallbacks,
        "empty_documents": empty,
        "ignored_files": len(layout.ignored),
        "ignored_examples": layout.ignored[:20],
        "max_document_bytes": cfg.max_document_bytes,
        "truncated_documents": len(truncated),
        "truncated_examples": dict(sorted(truncated.items())[:100]),  # doc_id -> its full size in bytes
        "strip": list(cfg.strip),
    }
    return table, stats


# -- step ------------------------------------------------------------------------------------------
STEP = Step("corpus", version=1)


@STEP.task
def corpus(cfg: CorpusConfig, archive: ArtifactRef, data_home: str | None = None) -> ArtifactRef:
    """Read the downloaded corpus archive and publish documents.parquet."""
    def build(store: ArtifactStore, out: Staging) -> dict:
        path = store.only_file(archive)
        members = iter_archive(path, cfg.max_extracted_bytes, max_member_bytes=cfg.max_document_bytes)
        try:
            table, stats = build_documents(members, cfg, archive=str(path))
        except Interrupted:  # a stop request says nothing about the archive
            raise
        except PipelineError:
            forget_download(archive, data_home)  # an unpinned URL that served an unusable archive is fetched again
            raise
        rows = out.write_parquet("documents.parquet", table, DOCUMENTS)
        log = step_logger()
        log.info("corpus %s: %s documents (%s), %d latin-1, %d empty, %d ignored files", path.name, f"{rows:,}",
                 stats["documents"], stats["latin1_fallbacks"], stats["empty_documents"], stats["ignored_files"])
        if stats["truncated_documents"]:
            log.warning("corpus %s: %d document(s) over corpus.max_document_bytes=%s were cut to that size: %s", path.name,
                        stats["truncated_documents"], f"{cfg.max_document_bytes:,}",
                        ", ".join(f"{d} ({n:,} bytes)" for d, n in list(stats["truncated_examples"].items())[:5]))
        return {"rows": rows, **stats}

    return STEP.run(data_home, cfg, [archive], build)
