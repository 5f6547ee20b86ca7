"""Corpus loading, document-level splits, and packing into fixed-length token sequences.

Documents, not tokens, are assigned to splits, so no text seen while training heads or gates
leaks into calibration or evaluation. Every result carries a content fingerprint so later
stages can key their caches on what the data is rather than where it came from.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.config import EMBEDDED_CORPUS, DataConfig
from pipeline.corpora import EmbeddedCorpusError, check_embedded, embedded_documents, embedded_stamp
from pipeline.fingerprint import stat_stamp

log = logging.getLogger(__name__)

# Suffix -> `datasets` builder. txt files are read directly (one file is one document), and so
# is JSON: our own parse names the line a bad record is on.
_TABULAR = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
_JSON = (".json", ".jsonl")
_SCHEMA_ROWS = 5  # JSON lines read to learn a file's fields before a run
_SUPPORTED = (".txt", *_TABULAR)
_SPLIT_ORDER = ("train", "calib", "eval")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
PACK_VERSION = "pack-v1"  # bump when packing changes, so old cached splits are not reused
_TOKENIZE_BATCH = 64  # documents per tokenizer call: fast tokenizers parallelise within a call
_PROGRESS_MIN_DOCS = 512  # below this, tokenizing takes about a second; no progress bar


class DataError(ValueError):
    """The corpus or split cannot be built as configured; the message says what to change."""


@dataclass(frozen=True)
class Corpus:
    """The documents in a fixed order; `fingerprint` hashes their contents in that order."""

    documents: list[str] = field(repr=False)
    source: str
    fingerprint: str


@dataclass(frozen=True)
class PackedSplit:
    """One split as a stream of documents (each followed by EOS) cut into equal sequences.

    `doc_ids` and `positions` let evaluation group tokens by document or by depth into it;
    `targets` is -1 only after the very last token of the stream.
    """

    name: str
    input_ids: np.ndarray  # [n_seq, seq_len] int32
    targets: np.ndarray  # [n_seq, seq_len] int32, next token, -1 past the end of the stream
    doc_ids: np.ndarray  # [n_seq, seq_len] int32, index of the source document in the corpus
    positions: np.ndarray  # [n_seq, seq_len] int32, position of the token inside its document
    fingerprint: str
    num_documents: int

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.size)


def _fingerprint_documents(documents: list[str]) -> str:
    h = hashlib.sha256()
    for doc in documents:
        data = doc.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))  # length prefix: ["ab", "c"] != ["a", "bc"]
        h.update(data)
    return h.hexdigest()


def looks_like_path(source: str, suffixes: tuple[str, ...] = _SUPPORTED) -> bool:
    """A source the user meant as a filesystem path rather than a hub id like `org/name`, so a
    missing path is reported as missing instead of being looked up on the hub. `suffixes` are
    file types that only a path can have (data files here; `.gguf` for a model)."""
    if source.startswith(("/", ".", "~")) or Path(source).suffix in suffixes:
        return True
    return (os.sep in source or "/" in source) and not _HUB_ID.match(source)


def _read_txt(path: Path) -> list[str]:
    try:
        return [path.read_text(encoding="utf-8")]
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e}); convert it, e.g. `iconv -t utf-8`") from e


def _text_column(ds, where: str, column: str) -> list[str]:
    """The text column of a `datasets.Dataset`, with None rows dropped and types checked."""
    return _text_values(ds.column_names, ds[column] if column in ds.column_names else [], where, column)


def _text_values(columns: list[str], values, where: str, column: str) -> list[str]:
    """A column's values, with None rows dropped and types checked; `columns` name the others."""
    if column not in columns:
        raise DataError(_no_column(where, column, columns))
    texts = [t for t in values if t is not None]
    bad = next((t for t in texts if not isinstance(t, str)), None)
    if bad is not None:
        raise DataError(
            f"column {column!r} of {where} holds {type(bad).__name__} values, not text; "
            "choose a text column: set data.text_column=<column>"
        )
    return texts


def _no_column(where: str, column: str, columns: list[str]) -> str:
    return f"{where} has no column {column!r}; its columns are {columns}; pick one: set data.text_column=<column>"


def _json_lines(path: Path, limit: int | None = None) -> list[dict]:
    """The records of a JSON-lines file (the first `limit`), each checked to be a JSON object; a
    bad line is named by its number, which a whole-file parser cannot do."""
    rows: list[dict] = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if limit is not None and len(rows) >= limit:
                break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"data file {path} line {number} is not UTF-8 ({e}); convert the file, "
                                "e.g. `iconv -t utf-8`") from e
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"data file {path} line {number} is not valid JSON ({e.msg.removesuffix(' at')}, column {e.colno}); "
                                "fix or delete that line") from e
            if not isinstance(row, dict):
                raise DataError(f"data file {path} line {number} is a JSON {type(row).__name__}, not an object "
                                "with a text field; give one object per line, e.g. {\"text\": \"...\"}")
            rows.append(row)
    return rows


def _read_json(path: Path, column: str) -> list[str]:
    """JSON lines (.jsonl, or .json holding lines), a JSON array of objects, or one object
    whose text column is a list (columnar)."""
    rows: list | None = None
    if path.suffix == ".json":
        try:
            whole = json.loads(path.read_bytes())
        except ValueError:  # not one JSON document: JSON lines, parsed below with line numbers
            whole = None
        if isinstance(whole, dict) and isinstance(whole.get(column), list):
            return _text_values(list(whole), whole[column], str(path), column)
        if isinstance(whole, (list, dict)):
            rows = whole if isinstance(whole, list) else [whole]
            bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
            if bad is not None:
                raise DataError(f"data file {path} item {bad} is a JSON {type(rows[bad]).__name__}, not an object "
                                "with a text field; give a list of objects, e.g. [{\"text\": \"...\"}]")
    if rows is None:
        rows = _json_lines(path)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return _text_values(columns, [row.get(column) for row in rows], str(path), column)


def _read_tabular(path: Path, column: str) -> list[str]:
    if path.suffix in _JSON:
        return _read_json(path, column)
    import datasets

    try:
        ds = datasets.load_dataset(_TABULAR[path.suffix], data_files=[str(path)], split="train")
    except Exception as e:  # datasets raises many kinds (ArrowInvalid, DatasetGenerationError, ...)
        raise DataError(f"could not read {path} as {path.suffix[1:]}: {e}; check the file's format") from e
    return _text_column(ds, str(path), column)


def _read_file(path: Path, column: str) -> list[str]:
    if path.suffix == ".txt":
        return _read_txt(path)
    return _read_tabular(path, column)


def _data_files(folder: Path) -> list[Path]:
    """All supported files under `folder` (recursively, hidden ones skipped), in path order."""
    files = sorted(
        (p for p in folder.rglob("*")
         if p.is_file() and p.suffix in _SUPPORTED
         and not any(part.startswith(".") for part in p.relative_to(folder).parts)),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    if not files:
        raise DataError(
            f"folder {str(folder)!r} holds no supported files ({', '.join(_SUPPORTED)}); "
            "add documents or point data.source elsewhere"
        )
    return files


def _read_folder(folder: Path, column: str) -> list[str]:
    files = _data_files(folder)
    log.info("reading %d files from %s", len(files), folder)
    return [doc for p in files for doc in _read_file(p, column)]


def _read_hub(cfg: DataConfig) -> list[str]:
    import datasets

    label = cfg.source + (f" ({cfg.name})" if cfg.name else "")
    try:
        ds = datasets.load_dataset(cfg.source, cfg.name, split=cfg.hub_split)
    except Exception as e:  # not found, offline, gated, bad split: all leave us without data
        raise DataError(
            f"dataset {label!r} split {cfg.hub_split!r} could not be loaded from the Hugging Face hub or its cache "
            f"({type(e).__name__}: {e}); check the name, download it while online, or pass a local file or folder "
            "as data.source"
        ) from e
    return _text_column(ds, f"dataset {label!r}", cfg.text_column)


def load_corpus(cfg: DataConfig) -> Corpus:
    """Read the configured documents in a deterministic order.

    Order matters: `max_documents` keeps the first N, and packed document ids index this list.
    """
    source = cfg.source
    if source.startswith("embedded:"):
        try:
            documents = embedded_documents(source)
        except EmbeddedCorpusError as e:
            raise DataError(str(e)) from e
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            documents = _read_folder(path, cfg.text_column)
        elif path.is_file():
            _check_suffix(path, source)
            documents = _read_file(path, cfg.text_column)
        elif looks_like_path(source):
            raise DataError(_missing_path(source))
        else:
            documents = _read_hub(cfg)

    total = len(documents)
    documents = [doc for doc in documents if doc.strip()]
    if total != len(documents):
        log.info("dropped %d empty documents of %d", total - len(documents), total)
    if not documents:
        raise DataError(
            f"data.source {source!r} yields no non-empty documents"
            + (f" in column {cfg.text_column!r}" if not source.startswith("embedded:") else "")
            + "; point data.source at text"
        )
    if cfg.max_documents is not None:
        documents = documents[: cfg.max_documents]
    log.info("corpus %s: %d documents, %d characters", source, len(documents), sum(map(len, documents)))
    return Corpus(documents=documents, source=source, fingerprint=_fingerprint_documents(documents))


def _missing_path(source: str) -> str:
    return (f"data path {source!r} does not exist; pass an existing file or folder, "
            f"a hub dataset name, or {EMBEDDED_CORPUS!r}")


def _check_suffix(path: Path, source: str) -> None:
    if path.suffix not in _SUPPORTED:
        raise DataError(f"data.source {source!r} has unsupported type {path.suffix or '(none)'!r}; "
                        f"use one of {', '.join(_SUPPORTED)} or a folder of them")


def check_data_source(cfg: DataConfig) -> None:
    """What can be known about the corpus before a run, in milliseconds: the path exists, its
    files have a supported type, tabular files have the text column (their header or first
    rows only) and text starts as UTF-8. A hub dataset is not asked (that needs the network);
    the full read still checks every row."""
    source = cfg.source
    if source.startswith("embedded:"):
        try:
            check_embedded(source)
        except EmbeddedCorpusError as e:
            raise DataError(str(e)) from e
        return
    path = Path(source).expanduser()
    if path.is_dir():
        files = _data_files(path)
    elif path.is_file():
        _check_suffix(path, source)
        files = [path]
    elif looks_like_path(source):
        raise DataError(_missing_path(source))
    else:
        return
    for file in files:
        _check_schema(file, cfg.text_column)


def _check_schema(path: Path, column: str) -> None:
    """One file's column names (or, for text, its first bytes), read without reading it all."""
    if path.suffix == ".txt":
        with open(path, "rb") as f:
            head = f.read(1 << 16)
            try:  # a character cut at the end of the 64 KiB read is not an error; one at the file's end is
                codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < 1 << 16)
            except UnicodeDecodeError as e:
                raise DataError(f"{path} is not UTF-8 text ({e}); convert it, e.g. `iconv -t utf-8`") from e
        return
    if path.suffix in _JSON:
        with open(path, "rb") as f:
            first = f.read(64).lstrip()[:1]
        if path.suffix == ".json" and first == b"[":
            return  # a JSON array: only a full parse reads it
        try:
            rows = _json_lines(path, _SCHEMA_ROWS)
        except DataError:
            if path.suffix == ".json":
                return  # one pretty-printed document, not lines: the full read parses it
            raise
        columns = list(dict.fromkeys(k for row in rows for k in row))
    elif path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            columns = next(csv.reader(f), [])
    else:
        import pyarrow.parquet as pq

        try:
            columns = list(pq.read_schema(path).names)
        except Exception as e:  # ArrowInvalid and kin: not a parquet file
            raise DataError(f"could not read {path} as parquet: {e}; check the file's format") from e
    if columns and column not in columns:
        raise DataError(_no_column(str(path), column, columns))


def corpus_stamp(cfg: DataConfig) -> str | None:
    """A cheap stamp of the corpus files (names, sizes, times), or None for a hub dataset, which
    has none: memos of what was derived from the corpus are keyed on it."""
    if cfg.source.startswith("embedded:"):
        return embedded_stamp(cfg.source)
    path = Path(cfg.source).expanduser()
    return stat_stamp(path) if path.exists() else None


def _unit_hash(seed: int, text: str) -> float:
    """A document's position in [0, 1), from its content and the seed alone."""
    digest = hashlib.sha256(f"{seed}\0".encode() + text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_splits(corpus: Corpus, fractions: dict[str, float], seed: int) -> dict[str, list[int]]:
    """Assign each document to a split by hashing (seed, content).

    Unlike a shuffle, adding documents never moves an existing one (so cached splits stay valid
    for old documents), and duplicate documents always land together, so they cannot leak
    across splits.
    """
    names = [n for n in _SPLIT_ORDER if n in fractions] + sorted(set(fractions) - set(_SPLIT_ORDER))
    if any(f < 0 for f in fractions.values()) or abs(sum(fractions.values()) - 1.0) > 1e-6:
        raise DataError(f"split fractions {fractions} must be non-negative and sum to 1")
    edges = np.cumsum([fractions[n] for n in names])  # [n_splits], upper edge of each bucket
    splits: dict[str, list[int]] = {n: [] for n in names}
    last = max(i for i, n in enumerate(names) if fractions[n] > 0)  # rounding slack goes here
    for index, doc in enumerate(corpus.documents):
        u = _unit_hash(seed, doc)
        bucket = next((i for i, edge in enumerate(edges) if u < edge and fractions[names[i]] > 0), last)
        splits[names[bucket]].append(index)
    empty = [n for n in names if fractions[n] > 0 and not splits[n]]
    if empty:
        raise DataError(
            f"split(s) {empty} received no documents: the corpus has only {len(corpus.documents)} document(s) "
            f"for fractions {fractions}; use more documents, larger fractions for {empty}, or another data.seed"
        )
    log.info("splits: %s", ", ".join(f"{n}={len(ix)}" for n, ix in splits.items()))
    return splits


def _tokenize(tokenizer, documents: list[str], split: str) -> list[list[int]]:
    from pipeline.progress import ProgressBar

    ids: list[list[int]] = []
    batches = range(0, len(documents), _TOKENIZE_BATCH)
    for start in ProgressBar(batches, desc=f"tokenizing {split}", unit="batch",
                      disable=len(documents) < _PROGRESS_MIN_DOCS):
        # verbose=False: documents are longer than the model's context on purpose; we cut them later.
        enc = tokenizer(documents[start:start + _TOKENIZE_BATCH], add_special_tokens=False, verbose=False)
        ids.extend(list(x) for x in enc["input_ids"])
    return ids


def pack_split(corpus: Corpus, tokenizer, split: str, cfg: DataConfig, tokenizer_fingerprint: str = "") -> PackedSplit:
    """Tokenize one split's documents into a single EOS-separated stream cut into `seq_len` pieces.

    Packing wastes no compute on padding; the remainder after the last full sequence is dropped.
    Pass the backbone's `tokenizer_fingerprint` so the split's fingerprint changes with the tokenizer.
    """
    assignment = assign_splits(corpus, cfg.fractions, cfg.seed)
    if split not in assignment:
        raise DataError(f"split {split!r} is unknown; use one of {sorted(assignment)}")
    doc_indices = assignment[split]
    seq_len = cfg.seq_len
    eos = tokenizer.eos_token_id
    if eos is None:
        log.warning("tokenizer has no EOS token; documents of %s are concatenated without a separator", split)

    token_lists = _tokenize(tokenizer, [corpus.documents[i] for i in doc_indices], split)
    if eos is not None:
        token_lists = [toks + [eos] for toks in token_lists]
    lengths = np.array([len(t) for t in token_lists], dtype=np.int64)  # [n_docs]
    total = int(lengths.sum())
    if total < seq_len:
        raise DataError(
            f"split {split!r} has {total} tokens in {len(doc_indices)} documents, fewer than one sequence of "
            f"data.seq_len={seq_len}; lower data.seq_len, give {split} a larger fraction, or add data"
        )
    if total and max(max(t) for t in token_lists if t) >= 2**31:
        raise DataError("token ids do not fit in int32; this tokenizer's vocabulary is too large")

    stream = np.fromiter((tok for toks in token_lists for tok in toks), dtype=np.int32, count=total)  # [total]
    doc_stream = np.repeat(np.asarray(doc_indices, dtype=np.int32), lengths)  # [total]
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)  # [total], stream offset of each token's document
    pos_stream = (np.arange(total, dtype=np.int64) - starts).astype(np.int32)  # [total]
    next_stream = np.empty_like(stream)  # [total]
    next_stream[:-1] = stream[1:]
    next_stream[-1] = -1

    n_seq = total // seq_len
    keep = n_seq * seq_len
    shape = (n_seq, seq_len)

    h = hashlib.sha256()
    for part in (PACK_VERSION, corpus.fingerprint, split, ",".join(map(str, doc_indices)), str(seq_len),
                 tokenizer_fingerprint):
        h.update(part.encode())
        h.update(b"\0")
    log.info("packed %s: %d documents, %d tokens -> %d sequences of %d (%d tokens dropped)",
             split, len(doc_indices), total, n_seq, seq_len, total - keep)
    return PackedSplit(
        name=split,
        input_ids=np.ascontiguousarray(stream[:keep].reshape(shape)),
        targets=np.ascontiguousarray(next_stream[:keep].reshape(shape)),
        doc_ids=np.ascontiguousarray(doc_stream[:keep].reshape(shape)),
        positions=np.ascontiguousarray(pos_stream[:keep].reshape(shape)),
        fingerprint=h.hexdigest(),
        num_documents=len(doc_indices),
    )
