"""extract: run the frozen backbone over one data split and cache chosen layers' hidden
states (zarr), with the backbone's final norm and LM head beside them (the teacher).

Content key: the model's identity (weight-file hashes or hub revision, dtype, quantization),
the tokenizer, a fingerprint of the split's packed tokens, and the cache layout settings.
Planning tokenizes the corpus (seconds) but never loads the model; the packed split it made
rides along to the build, so a miss does not tokenize twice.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flows.stages.base import Built, InputMismatch, Plan, Stage, StageContext
from pipeline.backbone import load_backbone, load_tokenizer, model_identity
from pipeline.config import Config, canonical
from pipeline.data import load_corpus, pack_split
from pipeline.extract import EXTRACT_CODE_VERSION, chunk_rows_for, extract_hidden_states
from pipeline.teacher import TeacherWeights
from stores.artifacts import ArtifactNotFound, ArtifactStore
from stores.cache import CacheReader, CacheSchema, CacheWriter
from stores.files import load_tensors_with_metadata, save_tensors

log = logging.getLogger(__name__)

CACHE_DIR = "cache.zarr"
TEACHER_FILE = "teacher.safetensors"
SPLITS = ("train", "calib", "eval")


class ExtractStage(Stage):
    name = "extract"
    code_version = EXTRACT_CODE_VERSION

    def __init__(self, split: str):
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
        self.split = split

    @property
    def params(self) -> dict:
        return {"split": self.split}

    def plan(self, ctx: StageContext, inputs: dict[str, str]) -> Plan:
        cfg = ctx.cfg
        identity = model_identity(cfg.model, ctx.store.file_hasher())
        tokenizer, tok_fp = load_tokenizer(cfg.model)
        packed = pack_split(load_corpus(cfg.data), tokenizer, self.split, cfg.data, tokenizer_fingerprint=tok_fp)
        ex = canonical(cfg.extract)
        config = {
            "model": identity, "tokenizer": tok_fp, "data": packed.fingerprint, "split": self.split,
            "seq_len": cfg.data.seq_len, "layers": ex["layers"], "storage_dtype": ex["storage_dtype"],
            "chunk_tokens": ex["chunk_tokens"], "max_tokens": ex["max_tokens"],
        }
        extra = {"source": {"model": cfg.model.source, "data": cfg.data.source}, "split": self.split,
                 "num_documents": packed.num_documents}
        return self.make_plan(config, {}, extra, scratch=packed)

    def build(self, ctx: StageContext, plan: Plan, staging: Path) -> Built:
        cfg = ctx.cfg
        packed = plan.scratch
        backbone = load_backbone(cfg.model, ctx.store.file_hasher())
        backbone.check_layers(cfg.extract.layers)
        backbone.check_seq_len(cfg.data.seq_len)
        seq_len = cfg.data.seq_len
        n_seq = packed.input_ids.shape[0]
        if cfg.extract.max_tokens is not None:
            n_seq = max(1, min(n_seq, cfg.extract.max_tokens // seq_len))
        schema = CacheSchema(num_tokens=n_seq * seq_len, hidden_size=backbone.hidden_size,
                             layers=tuple(cfg.extract.layers), storage_dtype=cfg.extract.storage_dtype,
                             chunk_rows=chunk_rows_for(seq_len, cfg.extract.chunk_tokens))
        if not (staging / TEACHER_FILE).exists():
            save_tensors(staging / TEACHER_FILE, *backbone.teacher_weights().to_state())
        attrs = {"key": plan.key, "seq_len": seq_len, "num_layers": backbone.num_layers,
                 "vocab_size": backbone.vocab_size, "model": plan.config["model"], "split": self.split}
        with CacheWriter(staging / CACHE_DIR, schema, attrs) as writer:
            result = extract_hidden_states(backbone, packed, cfg.extract.layers, writer,
                                           batch_size=cfg.extract.batch_size, max_sequences=n_seq,
                                           progress=ctx.progress)
            writer.finish()
        log.info("extract %s: %d tokens at %.0f tokens/s", self.split, schema.num_tokens, result.tokens_per_s)
        return Built(
            metrics={"tokens": schema.num_tokens, "tokens_per_s": round(result.tokens_per_s, 1),
                     "resumed_from": result.resumed_from,
                     "bytes_per_token_per_layer": schema.bytes_per_token_per_layer(),
                     "hidden_size": backbone.hidden_size, "num_layers": backbone.num_layers,
                     "vocab_size": backbone.vocab_size},
            extra={"device": str(backbone.device), "dtype": str(backbone.dtype).removeprefix("torch.")},
        )


# -- reading a published cache ------------------------------------------------------------------
def cache_path(store: ArtifactStore, key: str) -> Path:
    return store.path(ExtractStage.name, key) / CACHE_DIR


def teacher_path(store: ArtifactStore, key: str) -> Path:
    return store.path(ExtractStage.name, key) / TEACHER_FILE


def open_cache(store: ArtifactStore, key: str) -> CacheReader:
    if not store.exists(ExtractStage.name, key):
        raise ArtifactNotFound(f"no extract cache with key {key} under {store.root}; run `exitflow run extract` first")
    return CacheReader(cache_path(store, key))


def load_teacher(store: ArtifactStore, key: str) -> TeacherWeights:
    """The backbone's final norm and LM head stored beside cache `key`."""
    return TeacherWeights.from_state(*load_tensors_with_metadata(teacher_path(store, key)))


def resolve_cache(cfg: Config, store: ArtifactStore, split: str) -> str:
    """The key of the cache for `split`: ``inputs.<split>_cache`` when given (checked to come
    from the backbone the config names), else the key the config implies, which must exist."""
    explicit = getattr(cfg.inputs, f"{split}_cache")
    if explicit:
        m = store.resolve_input(explicit, f"{split}_cache", ExtractStage.name)
        want = model_identity(cfg.model, store.file_hasher())
        if m.config["model"] != want:
            raise InputMismatch(
                f"cache {m.key[:12]} was extracted from backbone {_describe_model(m.config['model'])}, but the config "
                f"names {_describe_model(want)}; pick a cache of this backbone (`exitflow ls --stage extract`) "
                f"or set model.source to match")
        if m.config["split"] != split:
            log.warning("inputs.%s_cache %s holds the %s split", split, m.key[:12], m.config["split"])
        return m.key
    plan = ExtractStage(split).plan(StageContext(cfg, store, progress=False), {})
    if not store.exists(ExtractStage.name, plan.key):
        raise ArtifactNotFound(f"no {split} cache for this config (key {plan.key[:12]}); "
                               f"run `exitflow run extract --split {split}` first")
    return plan.key


def _describe_model(identity: dict) -> str:
    weights = identity.get("weights") or {}
    digest = ",".join(f"{k}:{v[:8]}" for k, v in sorted(weights.items())) or identity.get("revision", "?")
    return (f"{identity.get('source') or identity.get('kind')} [{digest}, {identity.get('dtype')}, "
            f"{identity.get('quantization')}]")
