"""extract: run the frozen backbone over one data split and cache chosen layers' hidden
states (zarr), with the backbone's final norm and LM head beside them (the teacher).

Content key: the model's identity (weight-file hashes or hub revision, dtype, quantization),
the tokenizer, a fingerprint of the split's packed tokens, and the cache layout settings.
Planning tokenizes the corpus (seconds) but never loads the model; the packed split it made
rides along to the build, so a miss does not tokenize twice.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from flows.shards import extract_in_shards
from flows.stages.base import Built, InputMismatch, Plan, Stage, StageContext, run_stage, to_plain
from flows.stages.teacher import TEACHER_FILE, TeacherStage
from pipeline.backbone import load_backbone, load_tokenizer, model_identity
from pipeline.config import Config, ModelConfig, canonical
from pipeline.data import PACK_VERSION, PackedSplit, corpus_stamp, load_corpus, pack_split
from pipeline.extract import EXTRACT_CODE_VERSION, ExtractResult, chunk_rows_for, extract_hidden_states
from pipeline.fingerprint import tokenizer_stamp
from pipeline.teacher import TeacherWeights
from stores.artifacts import ArtifactNotFound, ArtifactStore, content_key
from stores.cache import CacheReader, CacheSchema, CacheWriter
from stores.files import load_tensors_with_metadata

log = logging.getLogger(__name__)

CACHE_DIR = "cache.zarr"
SPLITS = ("train", "calib", "eval")
PACK_MEMO = "packed-splits"


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
        """Keyed on the packed split's fingerprint. Packing needs the tokenizer (seconds to load
        from a GGUF file), so the fingerprint is remembered per model, corpus files, data
        settings and split: an unchanged re-run plans without tokenizing (hub datasets, which
        have no cheap stamp, are always packed)."""
        cfg = ctx.cfg
        identity = model_identity(cfg.model, ctx.store.file_hasher())
        memo_key = _pack_memo_key(cfg, identity, self.split)
        packed = None
        facts = ctx.store.memo_get(PACK_MEMO, memo_key) if memo_key else None
        if facts is None:
            packed, tok_fp = self.pack(cfg)
            facts = {"tokenizer": tok_fp, "data": packed.fingerprint, "num_documents": packed.num_documents}
            if memo_key:
                ctx.store.memo_put(PACK_MEMO, memo_key, facts)
        ex = canonical(cfg.extract)
        config = {
            "model": identity, "tokenizer": facts["tokenizer"], "data": facts["data"], "split": self.split,
            "seq_len": cfg.data.seq_len, "layers": ex["layers"], "storage_dtype": ex["storage_dtype"],
            "chunk_tokens": ex["chunk_tokens"], "max_tokens": ex["max_tokens"],
        }
        extra = {"source": {"model": cfg.model.source, "data": cfg.data.source}, "split": self.split,
                 "num_documents": facts["num_documents"]}
        return self.make_plan(config, {}, extra, scratch=packed)

    def pack(self, cfg: Config) -> tuple[PackedSplit, str]:
        """This split of the corpus, tokenized and packed, and the tokenizer's fingerprint."""
        tokenizer, tok_fp = _tokenizer(cfg.model)
        return pack_split(load_corpus(cfg.data), tokenizer, self.split, cfg.data, tokenizer_fingerprint=tok_fp), tok_fp

    def build(self, ctx: StageContext, plan: Plan, staging: Path) -> Built:
        cfg = ctx.cfg
        packed = plan.scratch
        if packed is None:  # planned from the memo
            packed, tok_fp = self.pack(cfg)
            if (tok_fp, packed.fingerprint) != (plan.config["tokenizer"], plan.config["data"]):
                raise InputMismatch(f"the {self.split} split packs differently from when it was planned (corpus or "
                                    "tokenizer files changed meanwhile); run again")
        backbone = load_backbone(cfg.model, ctx.store.file_hasher())
        backbone.check_layers(cfg.extract.layers)
        backbone.check_seq_len(cfg.data.seq_len)
        seq_len = cfg.data.seq_len
        n_seq = packed.input_ids.shape[0]
        if cfg.extract.max_tokens is not None:
            if cfg.extract.max_tokens < seq_len:  # the preflight says so first; a direct call must not exceed the cap
                raise InputMismatch(f"extract.max_tokens={cfg.extract.max_tokens} is less than one sequence of "
                                    f"data.seq_len={seq_len}; raise extract.max_tokens or lower data.seq_len")
            n_seq = min(n_seq, cfg.extract.max_tokens // seq_len)
        schema = CacheSchema(num_tokens=n_seq * seq_len, hidden_size=backbone.hidden_size,
                             layers=tuple(cfg.extract.layers), storage_dtype=cfg.extract.storage_dtype,
                             chunk_rows=chunk_rows_for(seq_len, cfg.extract.chunk_tokens))
        teacher_key = run_stage(TeacherStage(backbone), ctx, {})  # once per backbone, shared by its caches
        (staging / TEACHER_FILE).unlink(missing_ok=True)  # a copy an older version left in this staging folder
        attrs = {"key": plan.key, "seq_len": seq_len, "num_layers": backbone.num_layers,
                 "vocab_size": backbone.vocab_size, "model": plan.config["model"], "split": self.split}
        execution: dict = {}
        with CacheWriter(staging / CACHE_DIR, schema, attrs) as writer:  # creates the cache, or resumes it
            if cfg.extract.workers > 1 or cfg.extract.cluster:
                writer.close()
                result, execution = self._build_sharded(ctx, plan, staging / CACHE_DIR, schema, attrs, packed, n_seq)
            else:
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
            extra={"device": str(backbone.device), "dtype": str(backbone.dtype).removeprefix("torch."),
                   "teacher": teacher_key, **execution},
        )

    def _build_sharded(self, ctx: StageContext, plan: Plan, cache: Path, schema: CacheSchema, attrs: dict,
                       packed: PackedSplit, n_seq: int) -> tuple[ExtractResult, dict]:
        """Shards of the split on Dask workers into the created cache, then the cache finished
        here, as a single writer finishes it (same progress.json and checksums.json)."""
        run = extract_in_shards(ctx.cfg.extract, ctx.cfg.model, plan.config["model"], str(ctx.store.root), cache,
                                schema, attrs, packed, n_seq, progress=ctx.progress)
        with CacheWriter(cache, schema, attrs) as writer:
            writer.finish()
        tokens = sum(s.tokens for s in run.shards)
        result = ExtractResult(tokens=tokens, resumed_from=run.resumed_from, seconds=run.seconds,
                               tokens_per_s=tokens / run.seconds if run.seconds > 0 else float("nan"))
        execution = {"sharded": {"workers": run.workers, "shards": run.num_shards, "cluster": ctx.cfg.extract.cluster,
                                 "ran": [to_plain(s) for s in run.shards]}}
        return result, execution


@functools.lru_cache(maxsize=2)
def _tokenizer(model: ModelConfig):
    """One tokenizer load per process and model: the three splits pack with the same one."""
    return load_tokenizer(model)


def _pack_memo_key(cfg: Config, identity: dict, split: str) -> str | None:
    data_stamp, tok_stamp = corpus_stamp(cfg.data), tokenizer_stamp(cfg.model)
    if data_stamp is None or tok_stamp is None:
        return None
    return content_key("packed-split", PACK_VERSION, {"model": identity, "tokenizer_files": tok_stamp,
                                                           "corpus": data_stamp, "data": canonical(cfg.data),
                                                           "split": split}, {})


# -- reading a published cache ------------------------------------------------------------------
def cache_path(store: ArtifactStore, key: str) -> Path:
    return store.path(ExtractStage.name, key) / CACHE_DIR


def teacher_path(store: ArtifactStore, key: str) -> Path:
    """The teacher file of cache `key`: the backbone's shared ``teacher`` artifact, or the copy
    a cache written before teachers were shared keeps beside itself."""
    own = store.path(ExtractStage.name, key) / TEACHER_FILE
    if own.is_file():
        return own
    shared = store.manifest(ExtractStage.name, key).extra.get("teacher")
    if not shared or not store.exists(TeacherStage.name, shared):
        raise ArtifactNotFound(f"the teacher (final norm and LM head) of cache {key[:12]} is missing under "
                               f"{store.root} (teacher artifact {str(shared)[:12]}); re-run the extract stage")
    return store.path(TeacherStage.name, shared) / TEACHER_FILE


def open_cache(store: ArtifactStore, key: str) -> CacheReader:
    if not store.exists(ExtractStage.name, key):
        raise ArtifactNotFound(f"no extract cache with key {key} under {store.root}; run the extract stage first "
                               "(its deployment, or `exitflow run extract`)")
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
                               f"extract that split first (the extract deployment with split={split}, or "
                               f"`exitflow run extract --split {split}`)")
    return plan.key


def _describe_model(identity: dict) -> str:
    weights = identity.get("weights") or {}
    digest = ",".join(f"{k}:{v[:8]}" for k, v in sorted(weights.items())) or identity.get("revision", "?")
    return (f"{identity.get('source') or identity.get('kind')} [{digest}, {identity.get('dtype')}, "
            f"{identity.get('quantization')}]")
