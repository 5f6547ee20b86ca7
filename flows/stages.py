"""Stage wiring shared by the Prefect tasks and the CLI: plan a stage's content key from its
inputs without doing the work, then load from stores, call one pipeline function, save.

Planning is cheap on purpose (no backbone load): a cache hit must answer in seconds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import Config, canonical
from stores.artifacts import ArtifactStore, Manifest, content_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    stage: str
    key: str
    config: dict
    inputs: dict[str, str]
    code_version: str
    extra: dict = field(default_factory=dict)


# -- extract -----------------------------------------------------------------------------------
def plan_extract(cfg: Config, store: ArtifactStore, split: str | None = None) -> tuple[Plan, object, object]:
    """Content key of a cache: model identity, tokenizer, data fingerprint, split, sequence
    length, layers, storage dtype and the extraction code version.

    Returns the plan plus the tokenizer and packed split it computed on the way, so a run
    that misses the cache does not tokenize twice.
    """
    from pipeline.backbone import load_tokenizer, model_identity
    from pipeline.data import load_corpus, pack_split
    from pipeline.extract import EXTRACT_CODE_VERSION

    split = split or cfg.extract.split
    identity = model_identity(cfg.model, store.file_hasher())
    tokenizer, tok_fp = load_tokenizer(cfg.model)
    corpus = load_corpus(cfg.data)
    packed = pack_split(corpus, tokenizer, split, cfg.data, tokenizer_fingerprint=tok_fp)
    ex = canonical(cfg.extract)
    stage_cfg = {
        "model": identity,
        "tokenizer": tok_fp,
        "data": packed.fingerprint,
        "split": split,
        "seq_len": cfg.data.seq_len,
        "layers": ex["layers"],
        "storage_dtype": ex["storage_dtype"],
        "chunk_tokens": ex["chunk_tokens"],
        "max_tokens": ex["max_tokens"],
    }
    key = content_key("extract", EXTRACT_CODE_VERSION, stage_cfg, {})
    extra = {"source": {"model": cfg.model.source, "data": cfg.data.source}, "split": split,
             "num_documents": packed.num_documents}
    return Plan("extract", key, stage_cfg, {}, EXTRACT_CODE_VERSION, extra), tokenizer, packed


def run_extract(cfg: Config, store: ArtifactStore, split: str | None = None, progress: bool = True) -> str:
    """Extract one split into a content-addressed cache; a no-op when it already exists."""
    from pipeline.backbone import load_backbone
    from pipeline.extract import chunk_rows_for, extract_hidden_states
    from stores.cache import CacheSchema, CacheWriter, save_tensors

    plan, _, packed = plan_extract(cfg, store, split)
    if store.exists("extract", plan.key):
        log.info("extract %s: cache hit %s", plan.extra["split"], plan.key)
        return plan.key

    backbone = load_backbone(cfg.model, store.file_hasher())
    backbone.check_layers(cfg.extract.layers)
    backbone.check_seq_len(cfg.data.seq_len)
    seq_len = cfg.data.seq_len
    n_seq = packed.input_ids.shape[0]
    if cfg.extract.max_tokens is not None:
        n_seq = max(1, min(n_seq, cfg.extract.max_tokens // seq_len))
    schema = CacheSchema(
        num_tokens=n_seq * seq_len,
        hidden_size=backbone.hidden_size,
        layers=tuple(cfg.extract.layers),
        storage_dtype=cfg.extract.storage_dtype,
        chunk_rows=chunk_rows_for(seq_len, cfg.extract.chunk_tokens),
    )
    staging = store.staging("extract", plan.key)
    teacher_path = staging / "teacher.safetensors"
    if not teacher_path.exists():
        save_tensors(teacher_path, backbone.teacher_weights())
    attrs = {"key": plan.key, "seq_len": seq_len, "num_layers": backbone.num_layers,
             "vocab_size": backbone.vocab_size, "model": plan.config["model"], "split": plan.extra["split"]}
    with CacheWriter(staging / "cache.zarr", schema, attrs) as writer:
        result = extract_hidden_states(backbone, packed, cfg.extract.layers, writer,
                                       batch_size=cfg.extract.batch_size, max_sequences=n_seq, progress=progress)
        writer.finish()
    manifest = Manifest(
        stage="extract", key=plan.key, config=plan.config, inputs={}, code_version=plan.code_version,
        metrics={
            "tokens": schema.num_tokens,
            "tokens_per_s": round(result.tokens_per_s, 1),
            "resumed_from": result.resumed_from,
            "bytes_per_token_per_layer": schema.bytes_per_token_per_layer(),
            "hidden_size": backbone.hidden_size,
            "num_layers": backbone.num_layers,
            "vocab_size": backbone.vocab_size,
        },
        extra={**plan.extra, "device": str(backbone.device), "dtype": str(backbone.dtype).removeprefix("torch.")},
    )
    path = store.publish(manifest)
    log.info("extract %s: wrote %s (%d tokens) to %s", plan.extra["split"], plan.key, schema.num_tokens, path)
    return plan.key


def cache_path(store: ArtifactStore, key: str) -> Path:
    return store.path("extract", key) / "cache.zarr"


def teacher_path(store: ArtifactStore, key: str) -> Path:
    return store.path("extract", key) / "teacher.safetensors"
