"""Corpus loading, stable document splits and sequence packing."""

from __future__ import annotations

import csv
import json
import numpy as np
import pytest

from pipeline.config import DataConfig
from pipeline.data import Corpus, DataError, assign_splits, load_corpus, pack_split

FRACTIONS = {"train": 0.8, "calib": 0.1, "eval": 0.1}


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """Keep `datasets`' arrow cache for local files out of the user's home."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


@pytest.fixture(scope="module")
def embedded() -> Corpus:
    """The language reference alone: 79 documents, the same on every Python 3.11."""
    return load_corpus(DataConfig(source="embedded:pydoc"))


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


class CharTokenizer:
    """One token per character (its code point); EOS is 0. Makes packing arithmetic exact."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=True, verbose=True):
        assert add_special_tokens is False
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


def _corpus(docs: list[str]) -> Corpus:
    from pipeline.data import _fingerprint_documents

    return Corpus(documents=docs, source="test", fingerprint=_fingerprint_documents(docs))


# --- corpus loading -------------------------------------------------------------------------


def test_embedded_corpus(embedded):
    from pydoc_data.topics import topics

    assert len(embedded.documents) == 79
    assert embedded.documents == [topics[k] for k in sorted(topics)]
    assert embedded.fingerprint == load_corpus(DataConfig(source="embedded:pydoc")).fingerprint
    assert len(embedded.fingerprint) == 64


def test_default_corpus_adds_the_standard_library_docstrings(embedded):
    import abc
    import inspect

    wide = load_corpus(DataConfig())
    assert wide.source == "embedded:python-docs"
    assert wide.documents[:79] == embedded.documents
    stdlib = wide.documents[79:]
    assert len(stdlib) >= 50 and all(len(doc) > 2000 for doc in stdlib)
    assert sum(map(len, stdlib)) > sum(map(len, embedded.documents))  # what makes calib and eval big
    # one document per module, its long docstrings in source order
    abc_doc = next(doc for doc in stdlib if doc.startswith(inspect.cleandoc(abc.abstractmethod.__doc__)))
    assert inspect.cleandoc(abc.abstractproperty.__doc__) in abc_doc
    assert abc.__doc__ not in abc_doc  # a one-line module docstring is left out
    assert load_corpus(DataConfig()).fingerprint == wide.fingerprint


def test_embedded_corpus_errors_name_the_choices(monkeypatch, tmp_path):
    from pipeline.data import check_data_source

    for call in (load_corpus, check_data_source):
        with pytest.raises(DataError, match=r"'embedded:wiki' is not an embedded corpus; use one of "
                                            r"'embedded:python-docs' .*'embedded:pydoc'"):
            call(DataConfig(source="embedded:wiki"))
    import sysconfig

    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    with pytest.raises(DataError, match=r"no standard library sources in .*use data.source='embedded:pydoc'"):
        load_corpus(DataConfig())
    assert len(load_corpus(DataConfig(source="embedded:pydoc")).documents) == 79


def test_embedded_stamps_differ_by_corpus():
    from pipeline.data import corpus_stamp

    wide, small = corpus_stamp(DataConfig()), corpus_stamp(DataConfig(source="embedded:pydoc"))
    assert wide != small and wide == corpus_stamp(DataConfig())


def test_max_documents_keeps_the_first(embedded):
    few = load_corpus(DataConfig(source="embedded:pydoc", max_documents=5))
    assert few.documents == embedded.documents[:5]
    assert few.fingerprint != embedded.fingerprint


def test_folder_of_txt_files(corpus_dir):
    from pydoc_data.topics import topics

    corpus = load_corpus(DataConfig(source=str(corpus_dir)))
    assert corpus.documents == [topics[k] for k in sorted(topics)[:30]]
    assert corpus.source == str(corpus_dir)


def test_jsonl_with_custom_column(tmp_path):
    rows = [{"body": "first doc", "n": 1}, {"body": "", "n": 2}, {"body": "   ", "n": 3}, {"body": "second", "n": 4}]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    corpus = load_corpus(DataConfig(source=str(path), text_column="body"))
    assert corpus.documents == ["first doc", "second"]  # empty and blank rows dropped


def test_csv(tmp_path):
    path = tmp_path / "docs.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        w.writerows([[1, "alpha, with a comma"], [2, "beta\nover two lines"], [3, "gamma"]])
    corpus = load_corpus(DataConfig(source=str(path)))
    assert corpus.documents == ["alpha, with a comma", "beta\nover two lines", "gamma"]


def test_folder_mixes_txt_and_tabular_in_name_order(tmp_path):
    (tmp_path / "b.txt").write_text("from b")
    (tmp_path / "a.jsonl").write_text('{"text": "a1"}\n{"text": "a2"}')
    (tmp_path / "c.md").write_text("ignored: unsupported type")
    (tmp_path / ".hidden.txt").write_text("ignored: hidden")
    assert load_corpus(DataConfig(source=str(tmp_path))).documents == ["a1", "a2", "from b"]


def test_missing_column_lists_the_available_ones(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"body": "x", "title": "y"}')
    with pytest.raises(DataError, match=r"no column 'text'; its columns are \['body', 'title'\].*set data.text_column="):
        load_corpus(DataConfig(source=str(path)))


def test_empty_dataset_is_an_error(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": ""}\n{"text": "  "}')
    with pytest.raises(DataError, match="yields no non-empty documents in column 'text'"):
        load_corpus(DataConfig(source=str(path)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"holds no supported files \(.txt, .json, .jsonl, .parquet, .csv\)"):
        load_corpus(DataConfig(source=str(empty)))


@pytest.mark.parametrize("source", ["/no/such/corpus", "./nope.txt", "a/b/c", "corpus.jsonl"])
def test_missing_path(source):
    with pytest.raises(DataError, match=f"data path '{source}' does not exist"):
        load_corpus(DataConfig(source=source))


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "notes.md"
    path.write_text("# hi")
    with pytest.raises(DataError, match="unsupported type '.md'"):
        load_corpus(DataConfig(source=str(path)))


def test_unreachable_hub_dataset_suggests_a_local_path(monkeypatch):
    import datasets
    import huggingface_hub

    # The offline env vars are read when `datasets` is imported; set the live flags too so this
    # test does not sit through the hub client's retries.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="dataset 'exitflow-test/no-such-data' split 'train'.*local file or folder"):
        load_corpus(DataConfig(source="exitflow-test/no-such-data"))


# --- splits ---------------------------------------------------------------------------------


def test_splits_are_disjoint_cover_everything_and_are_deterministic(embedded):
    splits = assign_splits(embedded, FRACTIONS, seed=0)
    assert list(splits) == ["train", "calib", "eval"]
    flat = sorted(i for ix in splits.values() for i in ix)
    assert flat == list(range(79))
    assert all(ix == sorted(ix) for ix in splits.values())
    assert 50 <= len(splits["train"]) <= 75 and splits["calib"] and splits["eval"]
    assert assign_splits(embedded, FRACTIONS, seed=0) == splits
    assert assign_splits(embedded, FRACTIONS, seed=1) != splits


def test_adding_documents_never_moves_old_ones(embedded):
    def by_text(corpus):
        splits = assign_splits(corpus, FRACTIONS, seed=0)
        return {corpus.documents[i]: name for name, ix in splits.items() for i in ix}

    before = by_text(embedded)
    grown = _corpus(["a brand new first document"] + embedded.documents + ["and one at the end"])
    after = by_text(grown)
    assert {doc: after[doc] for doc in before} == before


def test_duplicate_documents_land_in_the_same_split(embedded):
    corpus = _corpus(embedded.documents + embedded.documents[:10])
    splits = assign_splits(corpus, FRACTIONS, seed=0)
    where = {i: name for name, ix in splits.items() for i in ix}
    assert all(where[i] == where[79 + i] for i in range(10))


def test_too_few_documents_for_a_split():
    with pytest.raises(DataError, match=r"received no documents: the corpus has only 1 document.*more documents"):
        assign_splits(_corpus(["just one"]), FRACTIONS, seed=0)


def test_zero_fraction_split_may_be_empty(embedded):
    splits = assign_splits(embedded, {"train": 0.9, "calib": 0.1, "eval": 0.0}, seed=0)
    assert splits["eval"] == [] and len(splits["train"]) + len(splits["calib"]) == 79


# --- packing --------------------------------------------------------------------------------


def test_pack_arithmetic_with_a_char_tokenizer():
    docs = ["abc", "de", "fghij", "k"]
    corpus = _corpus(docs)
    cfg = DataConfig(seq_len=4, fractions={"train": 1.0, "calib": 0.0, "eval": 0.0})
    packed = pack_split(corpus, CharTokenizer(), "train", cfg)
    # stream: a b c EOS d e EOS f g h i j EOS k EOS  (15 tokens) -> 3 sequences of 4, 3 dropped
    stream = [97, 98, 99, 0, 100, 101, 0, 102, 103, 104, 105, 106, 0, 107, 0]
    assert packed.input_ids.shape == (3, 4) and packed.input_ids.dtype == np.int32
    assert packed.input_ids.ravel().tolist() == stream[:12]
    assert packed.targets.ravel().tolist() == stream[1:13]
    assert packed.doc_ids.ravel().tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2]
    assert packed.positions.ravel().tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4]
    assert packed.num_documents == 4
    for arr in (packed.targets, packed.doc_ids, packed.positions):
        assert arr.shape == (3, 4) and arr.dtype == np.int32

    exact = pack_split(corpus, CharTokenizer(), "train", cfg.model_copy(update={"seq_len": 5}))  # 15 = 3 × 5
    assert exact.targets[-1, -1] == -1 and (exact.targets.ravel()[:-1] == np.array(stream[1:])).all()


def test_pack_real_tokenizer(embedded, tokenizer):
    cfg = DataConfig(seq_len=64)
    packed = pack_split(embedded, tokenizer, "calib", cfg, tokenizer_fingerprint="tok")
    calib = assign_splits(embedded, cfg.fractions, cfg.seed)["calib"]
    assert packed.name == "calib" and packed.num_documents == len(calib)
    n_seq = packed.input_ids.shape[0]
    assert n_seq > 10 and packed.input_ids.shape == (n_seq, 64)
    # Targets are the stream shifted by one, across sequence boundaries too.
    flat_in, flat_tgt = packed.input_ids.ravel(), packed.targets.ravel()
    assert (flat_tgt[:-1] == flat_in[1:]).all()
    # The first document appears whole, unchanged, followed by EOS, with positions 0..n.
    first = tokenizer(embedded.documents[calib[0]], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert flat_in[: len(first)].tolist() == first
    assert packed.doc_ids.ravel()[: len(first)].tolist() == [calib[0]] * len(first)
    assert packed.positions.ravel()[: len(first)].tolist() == list(range(len(first)))
    # Positions restart exactly where the document changes; document ids follow the split's order.
    doc_flat, pos_flat = packed.doc_ids.ravel(), packed.positions.ravel()
    changes = np.flatnonzero(np.diff(doc_flat)) + 1
    assert (pos_flat[changes] == 0).all()
    assert set(doc_flat.tolist()) <= set(calib) and (np.diff(doc_flat) >= 0).all()
    assert (pos_flat[1:][np.diff(doc_flat) == 0] == pos_flat[:-1][np.diff(doc_flat) == 0] + 1).all()


def test_pack_is_quiet_about_long_documents(embedded, tokenizer, caplog):
    tokenizer.model_max_length = 16  # every document is longer than this
    try:
        with caplog.at_level("WARNING"):
            pack_split(embedded, tokenizer, "eval", DataConfig(seq_len=32))
    finally:
        tokenizer.model_max_length = 512
    assert "longer than the specified maximum" not in caplog.text


def test_fingerprint_tracks_every_input(embedded):
    tok = CharTokenizer()
    cfg = DataConfig(seq_len=64)
    base = pack_split(embedded, tok, "eval", cfg, "t1")
    assert pack_split(embedded, tok, "eval", cfg, "t1").fingerprint == base.fingerprint
    assert pack_split(embedded, tok, "eval", cfg.model_copy(update={"seq_len": 65}), "t1").fingerprint != base.fingerprint
    assert pack_split(embedded, tok, "eval", cfg, "t2").fingerprint != base.fingerprint
    assert pack_split(embedded, tok, "calib", cfg, "t1").fingerprint != base.fingerprint
    assert pack_split(embedded, tok, "eval", cfg.model_copy(update={"seed": 3}), "t1").fingerprint != base.fingerprint
    bigger = _corpus(embedded.documents + ["one more document for the corpus"])
    assert pack_split(bigger, tok, "eval", cfg, "t1").fingerprint != base.fingerprint


def test_too_few_tokens_names_the_split_and_the_fix():
    corpus = _corpus(["abc", "defg", "hi"])
    cfg = DataConfig(seq_len=100, fractions={"train": 1.0, "calib": 0.0, "eval": 0.0})
    with pytest.raises(DataError, match=r"split 'train' has 12 tokens in 3 documents.*lower data.seq_len"):
        pack_split(corpus, CharTokenizer(), "train", cfg)


def test_unknown_split(embedded):
    with pytest.raises(DataError, match="split 'test' is unknown"):
        pack_split(embedded, CharTokenizer(), "test", DataConfig())
