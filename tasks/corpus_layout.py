"""Which records of a corpus are documents, their group (label) and split, and their order: pure functions
over Arrow arrays, so a million documents cost a few arrays, not a million Python objects.

Folder layouts (archives), found from the member paths, so any folder-per-label corpus works:
- split: `[<top>/]<name>-train/<group>/<file>` next to `<name>-test/<group>/<file>` (20news-bydate);
  a folder is a split root when its name is or ends in train/test (after -, _ or .).
- folders: `[<top>/]<group>/<file>` (the 19,997-message news20.tar.gz); the root is the folder
  holding the most documents two levels down.
A document is a regular file directly inside a class folder. Everything else (files next to the
class folders such as README, files in nested folders, hidden names like .DS_Store) is ignored and
counted. A class folder without documents is an error (it would shift every label after it). A path
that occurs twice in an archive is one document: the later member wins, as when extracting.

Tables: one document per row; group = the label column's value as text; split = the split column
("train"/"test", any case) when there is one. A label seen only in the test split is an error (the
model could never predict it); one seen only in train is kept (it has no test support).

Without a split (folders, or a table without a split column) a seeded, stratified split is drawn
(CorpusConfig.test_fraction, seed) over the documents ordered by (group, name). Labels are indices
into the sorted group names. Final order: split, label, then file name (folders) or row (tables).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage.errors import InputFormatError

_SPLIT_RE = re.compile(r"(?:^|[-_.])(train|test)$", re.IGNORECASE)
_HIDDEN = r"(^|/)\."
SPLITS = ("train", "test")


@dataclass
class Layout:
    kind: str  # "split", "folders" or "table"
    groups: list[str]  # sorted; a document's label is its group's index
    documents: pa.Table  # ordinal (position of the record in the source), split (null: to draw), group, name
    order_by: str = "name"  # the column that orders documents within a group: "name" (files) or "ordinal" (rows)
    ignored: int = 0
    ignored_examples: list[str] = field(default_factory=list)


def _strings(values: Iterable[str] | pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks() if values.num_chunks else pa.array([], pa.string())
    return values if isinstance(values, pa.Array) else pa.array(list(values), pa.string())


def _parts(path: str) -> tuple[str, ...]:
    return tuple(path.split("/")) if path else ()


def _class_folders(counts: dict[tuple[str, ...], int], dirs: list[tuple[str, ...]], archive: str
                   ) -> tuple[str, dict[tuple[str, ...], tuple[str | None, str]]]:
    """(layout kind, {class folder: (split, group)}) from the visible folders holding files (with their file counts)."""
    grandparents: Counter = Counter()
    for folder, n in counts.items():
        if folder:
            grandparents[folder[:-1]] += n
    if not grandparents:
        raise InputFormatError(f"{archive}: no class folders found (expected <group>/<file> members)")
    by_parent: dict[tuple[str, ...], dict[str, tuple[str, ...]]] = {}
    for gp in grandparents:
        if gp and (m := _SPLIT_RE.search(gp[-1])):
            by_parent.setdefault(gp[:-1], {})[m.group(1).lower()] = gp
    split_parents = [parent for parent, splits in by_parent.items() if set(splits) == set(SPLITS)]
    if len(split_parents) > 1:
        raise InputFormatError(f"{archive}: several train/test folder pairs: {sorted('/'.join(p) or '.' for p in split_parents)}")
    if split_parents:
        splits = by_parent[split_parents[0]]
        roots: dict[tuple[str, ...], str | None] = {splits["train"]: "train", splits["test"]: "test"}
        kind = "split"
    else:
        roots, kind = {sorted(grandparents.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]: None}, "folders"

    folders: dict[str | None, set[str]] = {}
    for root, split in roots.items():
        n = len(root)
        folders[split] = {d[n] for d in [*dirs, *counts] if len(d) > n and d[:n] == root}
    for root, split in roots.items():
        for group in sorted(folders[split]):
            if counts.get((*root, group), 0) == 0:
                raise InputFormatError(f"{archive}: class folder {'/'.join((*root, group))!r} holds no documents "
                                       "(documents must be files directly inside their class folder)")
    if kind == "split" and folders["train"] != folders["test"]:
        raise InputFormatError(f"{archive}: train and test have different class folders: only in train "
                               f"{sorted(folders['train'] - folders['test'])}, only in test "
                               f"{sorted(folders['test'] - folders['train'])}")
    return kind, {folder: (roots[folder[:-1]], folder[-1]) for folder in counts if folder and folder[:-1] in roots}


def find_layout(paths: Iterable[str] | pa.Array | pa.ChunkedArray, dirs: Iterable[str] = (), archive: str = "archive") -> Layout:
    """The layout of an archive from its file member paths (in archive order) and its directory members."""
    paths = _strings(paths)
    hidden = pc.fill_null(pc.match_substring_regex(paths, _HIDDEN), False)
    folder = pc.replace_substring_regex(paths, r"/?[^/]*$", "")
    visible = pc.value_counts(folder.filter(pc.invert(hidden)))
    counts = {_parts(f): n for f, n in zip(visible.field("values").to_pylist(), visible.field("counts").to_pylist(), strict=True)}
    dir_parts = [_parts(d) for d in dirs if not re.search(_HIDDEN, d)]
    kind, class_folders = _class_folders(counts, dir_parts, archive)

    names = list(class_folders)
    position = pc.index_in(folder, value_set=pa.array(["/".join(f) for f in names], pa.string()))
    is_document = pc.and_(position.is_valid(), pc.invert(hidden))
    ordinal = np.flatnonzero(is_document.to_numpy(zero_copy_only=False))
    position = position.filter(is_document)
    documents = pa.table({
        "ordinal": pa.array(ordinal, pa.int64()),
        "split": pc.take(pa.array([class_folders[f][0] for f in names], pa.string()), position),
        "group": pc.take(pa.array([class_folders[f][1] for f in names], pa.string()), position),
        "name": pc.replace_substring_regex(paths.filter(is_document), r"^.*/", ""),
    })
    documents = _last_of_each_path(documents, paths.filter(is_document))
    groups = sorted({group for _, group in class_folders.values()})
    if len(groups) < 2:
        raise InputFormatError(f"{archive}: found {len(groups)} class folder(s) {groups}; a classifier needs at least 2")
    ignored = paths.filter(pc.invert(is_document))
    examples = pc.take(ignored, pc.sort_indices(ignored)[:20]).to_pylist() if len(ignored) else []
    return Layout(kind, groups, documents, "name", len(ignored), examples)


def _last_of_each_path(documents: pa.Table, paths: pa.Array) -> pa.Table:
    """Keep only the last member of a path that occurs more than once (rare: tar files appended to)."""
    if pc.count_distinct(paths).as_py() == len(paths):
        return documents
    order = pc.sort_indices(pa.table({"path": paths, "ordinal": documents["ordinal"]}),
                            sort_keys=[("path", "ascending"), ("ordinal", "descending")]).to_numpy()
    sorted_paths = paths.take(pa.array(order)).to_numpy(zero_copy_only=False)
    first = np.ones(len(order), dtype=bool)
    first[1:] = sorted_paths[1:] != sorted_paths[:-1]
    return documents.take(pa.array(np.sort(order[first])))


def table_layout(labels: pa.Array | pa.ChunkedArray, splits: pa.Array | pa.ChunkedArray | None, source: str) -> Layout:
    """The layout of a table: its label column and optional split column, one value per row (strings)."""
    labels = _strings(labels)
    missing = pc.or_(labels.is_null(), pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(labels)), 0))
    if pc.any(missing).as_py():
        raise InputFormatError(f"{source}: row {_first_row(missing)} has an empty label")
    if splits is not None:
        splits = pc.utf8_lower(pc.utf8_trim_whitespace(_strings(splits)))
        bad = pc.invert(pc.fill_null(pc.is_in(splits, value_set=pa.array(SPLITS)), False))
        if pc.any(bad).as_py():
            row = _first_row(bad)
            raise InputFormatError(f"{source}: row {row} has split {splits[row - 1].as_py()!r}; expected 'train' or 'test'")
        train = set(pc.unique(labels.filter(pc.equal(splits, "train"))).to_pylist())
        test_only = sorted(set(pc.unique(labels.filter(pc.equal(splits, "test"))).to_pylist()) - train)
        if test_only:
            row = _first_row(pc.equal(labels, test_only[0]))
            raise InputFormatError(f"{source}: label {test_only[0]!r} (first at row {row}) appears only in the test split; "
                                   "the model could never predict it (give it training rows or drop those rows)")
    groups = sorted(pc.unique(labels).to_pylist())
    if len(groups) < 2:
        raise InputFormatError(f"{source}: found {len(groups)} label(s) {groups}; a classifier needs at least 2")
    rows = np.arange(len(labels), dtype=np.int64)
    documents = pa.table({
        "ordinal": pa.array(rows),
        "split": splits if splits is not None else pa.nulls(len(labels), pa.string()),
        "group": labels,
        "name": pc.cast(pa.array(rows + 1), pa.string()),  # the row number, counting from 1
    })
    return Layout("table", groups, documents, "ordinal")


def _first_row(mask: pa.Array) -> int:
    """The first row (counting from 1) where mask is true."""
    return int(np.flatnonzero(pc.fill_null(mask, False).to_numpy(zero_copy_only=False))[0]) + 1


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


def ordered_documents(layout: Layout, test_fraction: float, seed: int) -> pa.Table:
    """The documents in their final order with split, label and doc_id ("<split>/<group>/<name>") set."""
    docs = layout.documents
    docs = docs.append_column("label", pc.index_in(docs["group"], value_set=pa.array(layout.groups)).cast(pa.int16()))
    if docs["split"].null_count:  # no split given: a stratified one over (group, name) order
        docs = docs.sort_by([("label", "ascending"), (layout.order_by, "ascending")])
        mask = stratified_test_mask(docs["label"].to_numpy(), test_fraction, seed)
        docs = docs.set_column(docs.schema.get_field_index("split"), "split", pa.array(np.where(mask, "test", "train")))
    docs = docs.sort_by([("split", "ascending"), ("label", "ascending"), (layout.order_by, "ascending")])
    doc_id = pc.binary_join_element_wise(docs["split"], docs["group"], docs["name"], "/")
    return docs.append_column("doc_id", doc_id)
