"""Stage wiring shared by the Prefect tasks and the CLI: plan a stage's content key from its
inputs without doing the work, then load from stores, call one pipeline function, save.

Planning is cheap on purpose (no backbone load): a cache hit must answer in seconds.
"""

from __future__ import annotations

import logging
import shutil
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
    attrs = {"key": plan.key, "seq_len": seq_len, "num_layers": backbone.num_layers, "norm_eps": backbone.final_norm_eps,
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


# -- inputs ------------------------------------------------------------------------------------
class InputMismatch(ValueError):
    """An upstream artifact does not belong with this config (another backbone, other layers)."""


def resolve_cache(cfg: Config, store: ArtifactStore, split: str) -> str:
    """The cache for `split`: the key given in ``inputs.<split>_cache``, else the one the config
    implies (which must exist: the flows run extract first). Checks it was made from the
    backbone the config names."""
    from pipeline.backbone import model_identity

    explicit = getattr(cfg.inputs, f"{split}_cache")
    if explicit:
        m = store.resolve(explicit, "extract")
        want = model_identity(cfg.model, store.file_hasher())
        if m.config["model"] != want:
            raise InputMismatch(
                f"cache {m.key[:12]} was extracted from backbone {_describe_model(m.config['model'])}, but the config "
                f"names {_describe_model(want)}; pick a cache of this backbone (`exitflow ls --stage extract`) "
                f"or set model.source to match"
            )
        if m.config["split"] != split:
            log.warning("inputs.%s_cache %s holds the %s split", split, m.key[:12], m.config["split"])
        return m.key
    plan, _, _ = plan_extract(cfg, store, split)
    if not store.exists("extract", plan.key):
        from stores.artifacts import ArtifactNotFound

        raise ArtifactNotFound(f"no {split} cache for this config (key {plan.key[:12]}); run `exitflow run extract --split {split}` first")
    return plan.key


def _describe_model(identity: dict) -> str:
    weights = identity.get("weights") or {}
    digest = ",".join(f"{k}:{v[:8]}" for k, v in sorted(weights.items())) or identity.get("revision", "?")
    return f"{identity.get('source') or identity.get('kind')} [{digest}, {identity.get('dtype')}, {identity.get('quantization')}]"


def _open_cache(store: ArtifactStore, key: str):
    from pipeline.teacher import TeacherWeights
    from stores.cache import CacheReader, load_tensors

    reader = CacheReader(cache_path(store, key))
    teacher = TeacherWeights.from_dict(load_tensors(teacher_path(store, key)),
                                       norm_eps=float(reader.attrs.get("norm_eps", 1e-5)))
    return reader, teacher


def _head_layers(cfg: Config, reader) -> list[int]:
    cached = [int(x) for x in reader.layers]
    layers = cfg.heads.layers or cached
    missing = [x for x in layers if x not in cached]
    if missing:
        raise InputMismatch(f"heads.layers {missing} are not in the cache (it holds {cached}); "
                            f"train heads for cached layers or extract with --set extract.layers=[...]")
    return sorted(layers)


# -- train_heads -------------------------------------------------------------------------------
def plan_train_heads(cfg: Config, store: ArtifactStore, cache_key: str, eval_key: str | None) -> Plan:
    from pipeline.train import TRAIN_CODE_VERSION

    reader, _ = _open_cache(store, cache_key)
    stage_cfg = {**canonical(cfg.heads), "layers": _head_layers(cfg, reader)}
    inputs = {"cache": cache_key, **({"eval_cache": eval_key} if eval_key else {})}
    return Plan("train_heads", content_key("train_heads", TRAIN_CODE_VERSION, stage_cfg, inputs), stage_cfg, inputs, TRAIN_CODE_VERSION)


def run_train_heads(cfg: Config, store: ArtifactStore, cache_key: str, eval_key: str | None = None,
                    progress: bool = True) -> str:
    """Train one head per exit layer from the cache; evaluate them and the logit lens on the
    eval cache. Resumes from the last epoch checkpoint of an interrupted run."""
    from pipeline.train import train_heads
    from stores.checkpoints import FileCheckpoints

    plan = plan_train_heads(cfg, store, cache_key, eval_key)
    if store.exists("train_heads", plan.key):
        return plan.key
    reader, teacher = _open_cache(store, cache_key)
    layers = plan.config["layers"]
    staging = store.staging("train_heads", plan.key)
    result = train_heads(cfg.heads, layers, int(reader.attrs["num_layers"]), teacher, reader,
                         checkpoints=FileCheckpoints(staging / "checkpoints"), progress=progress,
                         **_teacher_topk_kwargs(cfg, store, cache_key))
    _publish_heads(cfg, store, plan, result, teacher, eval_key, model=reader.attrs["model"],
                   num_layers=int(reader.attrs["num_layers"]), hidden_size=reader.hidden_size)
    return plan.key


def plan_train_heads_online(cfg: Config, store: ArtifactStore, eval_key: str | None):
    """Online heads are keyed on what a train cache would have been keyed on (the data, the
    backbone, the layers), without writing that cache."""
    from pipeline.train import TRAIN_CODE_VERSION

    data_plan, _, packed = plan_extract(cfg, store, "train")
    stage_cfg = {**canonical(cfg.heads), "layers": sorted(cfg.heads.layers or cfg.extract.layers)}
    inputs = {"data": data_plan.key, **({"eval_cache": eval_key} if eval_key else {})}
    key = content_key("train_heads", TRAIN_CODE_VERSION, stage_cfg, inputs)
    return Plan("train_heads", key, stage_cfg, inputs, TRAIN_CODE_VERSION), data_plan, packed


def run_train_heads_online(cfg: Config, store: ArtifactStore, eval_key: str | None = None, progress: bool = True) -> str:
    """The same heads, trained with the backbone running every step (no train cache)."""
    from pipeline.backbone import load_backbone
    from pipeline.teacher import TeacherWeights
    from pipeline.train import OnlineSource, train_heads
    from stores.checkpoints import FileCheckpoints

    plan, data_plan, packed = plan_train_heads_online(cfg, store, eval_key)
    if store.exists("train_heads", plan.key):
        return plan.key
    backbone = load_backbone(cfg.model, store.file_hasher())
    layers = plan.config["layers"]
    backbone.check_layers(layers)
    backbone.check_seq_len(cfg.data.seq_len)
    teacher = TeacherWeights.from_dict(backbone.teacher_weights(), norm_eps=backbone.final_norm_eps)
    max_seq = cfg.extract.max_tokens // cfg.data.seq_len if cfg.extract.max_tokens else None
    source = OnlineSource(backbone, packed, layers, sequences_per_forward=cfg.extract.batch_size, max_sequences=max_seq)
    staging = store.staging("train_heads", plan.key)
    result = train_heads(cfg.heads, layers, backbone.num_layers, teacher, source,
                         checkpoints=FileCheckpoints(staging / "checkpoints"), progress=progress, device=backbone.device)
    _publish_heads(cfg, store, plan, result, teacher, eval_key, model=data_plan.config["model"],
                   num_layers=backbone.num_layers, hidden_size=backbone.hidden_size)
    return plan.key


def _publish_heads(cfg: Config, store: ArtifactStore, plan: Plan, result, teacher, eval_key: str | None, *,
                   model: dict, num_layers: int, hidden_size: int) -> None:
    """Save trained heads, evaluate them and the logit lens on the eval cache, publish."""
    from pipeline.heads import load_heads
    from pipeline.train import evaluate_heads, logit_lens
    from stores.cache import save_tensors

    staging = store.staging("train_heads", plan.key)
    layers = plan.config["layers"]
    save_tensors(staging / "heads.safetensors", result.state)
    metrics = {
        "steps": result.steps, "tokens_per_s": round(result.tokens_per_s, 1),
        "resumed_from_epoch": result.resumed_from_epoch,
        "epochs": [_plain(e) for e in result.epochs],
    }
    if eval_key:
        eval_reader, _ = _open_cache(store, eval_key)
        heads = load_heads(cfg.heads, layers, teacher, result.state)
        trained = evaluate_heads(heads, teacher, eval_reader)
        lens = evaluate_heads(logit_lens(teacher, layers), teacher, eval_reader)
        metrics["eval"] = {str(k): _plain(v) for k, v in trained.items()}
        metrics["logit_lens"] = {str(k): _plain(v) for k, v in lens.items()}
        for layer in layers:
            log.info("layer %d: agreement %.3f (logit lens %.3f), accuracy %.3f, entropy AUROC %.3f",
                     layer, trained[layer].agreement, lens[layer].agreement, trained[layer].accuracy,
                     trained[layer].entropy_auroc)
    shutil.rmtree(staging / "checkpoints", ignore_errors=True)  # the published weights supersede them
    store.publish(Manifest(stage="train_heads", key=plan.key, config=plan.config, inputs=plan.inputs,
                           code_version=plan.code_version, metrics=metrics,
                           extra={"num_layers": num_layers, "hidden_size": hidden_size, "model": model}))


def _teacher_topk_kwargs(cfg: Config, store: ArtifactStore, cache_key: str) -> dict:
    """The efficient loss reads the teacher's top-k from its own content-addressed artifact,
    computed once per cache and shared by every training run on it."""
    if not cfg.heads.efficient_loss:
        return {}
    from flows.stage_teacher import open_stage_teacher_topk, run_teacher_topk

    return {"teacher_topk": open_stage_teacher_topk(store, run_teacher_topk(cfg, store, cache_key))}


def _plain(obj) -> dict:
    """A result dataclass as JSON-able dict (dict keys as strings, floats rounded)."""
    from dataclasses import asdict, is_dataclass

    def clean(x):
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        if isinstance(x, float):
            return round(x, 5)
        return x

    return clean(asdict(obj) if is_dataclass(obj) else obj)


# -- train_gates -------------------------------------------------------------------------------
def plan_train_gates(cfg: Config, store: ArtifactStore, cache_key: str, heads_key: str, eval_key: str | None) -> Plan:
    from pipeline.train import TRAIN_CODE_VERSION

    stage_cfg = canonical(cfg.gates)
    inputs = {"cache": cache_key, "heads": heads_key, **({"eval_cache": eval_key} if eval_key else {})}
    return Plan("train_gates", content_key("train_gates", TRAIN_CODE_VERSION, stage_cfg, inputs), stage_cfg, inputs, TRAIN_CODE_VERSION)


def _load_heads(store: ArtifactStore, heads_key: str, teacher):
    from pipeline.config import HeadsConfig
    from pipeline.heads import load_heads
    from stores.cache import load_tensors

    m = store.manifest("train_heads", heads_key)
    heads_cfg = HeadsConfig.model_validate({k: v for k, v in m.config.items()})
    state = load_tensors(store.path("train_heads", heads_key) / "heads.safetensors")
    return load_heads(heads_cfg, m.config["layers"], teacher, state), m


def run_train_gates(cfg: Config, store: ArtifactStore, cache_key: str, heads_key: str, eval_key: str | None = None,
                    progress: bool = True) -> str:
    """Train one exit gate per head; report each gate's AUROC for "the head agrees with the
    final layer" beside the head's own entropy as a predictor, on the eval cache."""
    from pipeline.gates import gate_exit_probabilities, load_gates
    from pipeline.train import collect_exit_labels, train_gates
    from sklearn.metrics import roc_auc_score
    from stores.cache import save_tensors
    from stores.checkpoints import FileCheckpoints

    plan = plan_train_gates(cfg, store, cache_key, heads_key, eval_key)
    if store.exists("train_gates", plan.key):
        return plan.key
    reader, teacher = _open_cache(store, cache_key)
    heads, heads_m = _load_heads(store, heads_key, teacher)
    if heads_m.inputs.get("cache", cache_key) != cache_key:
        log.warning("heads %s were trained on cache %s, gates train on %s", heads_key[:12],
                    heads_m.inputs.get("cache", "")[:12], cache_key[:12])
    layers = heads_m.config["layers"]
    num_layers = int(reader.attrs["num_layers"])
    staging = store.staging("train_gates", plan.key)
    result = train_gates(cfg.gates, heads, layers, num_layers, teacher, reader,
                         checkpoints=FileCheckpoints(staging / "checkpoints"), progress=progress,
                         max_label_tokens=cfg.gates.max_tokens)
    save_tensors(staging / "gates.safetensors", result.state)
    metrics = {"steps": result.steps, "heldout_auroc": _plain(result.auroc),
               "heldout_entropy_auroc": _plain(result.entropy_auroc), "epochs": [_plain(e) for e in result.epochs]}
    if eval_key:
        eval_reader, _ = _open_cache(store, eval_key)
        labels = collect_exit_labels(heads, teacher, eval_reader)
        gates = load_gates(cfg.gates, reader.hidden_size, result.state)
        probs = gate_exit_probabilities(gates, eval_reader)
        ev = {}
        for layer in layers:
            y = labels[f"correct_{layer}"]
            both = len(set(y.tolist())) == 2
            ev[str(layer)] = {
                "agreement": round(float(y.mean()), 5),
                "gate_auroc": round(float(roc_auc_score(y, probs[layer])), 5) if both else None,
                "entropy_auroc": round(float(roc_auc_score(y, -labels[f"entropy_{layer}"])), 5) if both else None,
            }
            log.info("gate %d: eval AUROC %.3f vs entropy %.3f", layer, ev[str(layer)]["gate_auroc"] or float("nan"),
                     ev[str(layer)]["entropy_auroc"] or float("nan"))
        metrics["eval"] = ev
    shutil.rmtree(staging / "checkpoints", ignore_errors=True)  # the published weights supersede them
    store.publish(Manifest(stage="train_gates", key=plan.key, config=plan.config, inputs=plan.inputs,
                           code_version=plan.code_version, metrics=metrics, extra={"layers": layers}))
    return plan.key


# -- calibrate ---------------------------------------------------------------------------------
CALIBRATE_CODE_VERSION = "calibrate-1"


def plan_calibrate(cfg: Config, store: ArtifactStore, calib_key: str, heads_key: str, gates_key: str | None,
                   eval_key: str | None) -> Plan:
    stage_cfg = canonical(cfg.calibrate)
    inputs = {"calib_cache": calib_key, "heads": heads_key, **({"gates": gates_key} if gates_key else {}),
              **({"eval_cache": eval_key} if eval_key else {})}
    return Plan("calibrate", content_key("calibrate", CALIBRATE_CODE_VERSION, stage_cfg, inputs), stage_cfg, inputs,
                CALIBRATE_CODE_VERSION)


def score_split(store: ArtifactStore, cache_key: str, heads_key: str, gates_key: str | None):
    """Per-token exit labels (correct, entropy) of every head and the gates' p_exit on a cache."""
    from pipeline.config import GatesConfig
    from pipeline.gates import gate_exit_probabilities, load_gates
    from pipeline.train import collect_exit_labels
    from stores.cache import load_tensors

    reader, teacher = _open_cache(store, cache_key)
    heads, heads_m = _load_heads(store, heads_key, teacher)
    labels = collect_exit_labels(heads, teacher, reader)
    probs = None
    if gates_key:
        gm = store.manifest("train_gates", gates_key)
        if gm.inputs["heads"] != heads_key:
            raise InputMismatch(f"gates {gates_key[:12]} belong to heads {gm.inputs['heads'][:12]}, not {heads_key[:12]}; "
                                "pass the gates trained on these heads")
        gates = load_gates(GatesConfig.model_validate(gm.config), reader.hidden_size,
                           load_tensors(store.path("train_gates", gates_key) / "gates.safetensors"))
        probs = gate_exit_probabilities(gates, reader)
    return labels, probs, heads_m, int(reader.attrs["num_layers"])


def run_calibrate(cfg: Config, store: ArtifactStore, calib_key: str, heads_key: str, gates_key: str | None = None,
                  eval_key: str | None = None) -> str:
    """Thresholds per head, predictor and level with a Learn-then-Test guarantee, the cascade,
    and (given an eval cache) how each threshold holds on held-out tokens: calibration.json."""
    from pipeline.calibrate import calibrate_exits, check_held_out
    from stores.artifacts import write_json_atomic

    plan = plan_calibrate(cfg, store, calib_key, heads_key, gates_key, eval_key)
    if store.exists("calibrate", plan.key):
        return plan.key
    heads_m = store.manifest("train_heads", heads_key)
    calib_m = store.manifest("extract", calib_key)
    missing = [x for x in heads_m.config["layers"] if x not in calib_m.config["layers"]]
    heads_model = heads_m.extra.get("model") or store.manifest("extract", heads_m.inputs["cache"]).config["model"]
    if calib_m.config["model"] != heads_model or missing:
        raise InputMismatch(f"heads {heads_key[:12]} were trained on another backbone or on layers {missing} that calib "
                            f"cache {calib_key[:12]} lacks; calibrate heads on a cache of the same backbone and layers")
    labels, probs, heads_m, num_layers = score_split(store, calib_key, heads_key, gates_key)
    calibration = calibrate_exits(labels, probs, heads_m.config["layers"], num_layers, cfg.calibrate)
    metrics: dict = {"n": calibration["n"]}
    if eval_key:
        ev_labels, ev_probs, _, _ = score_split(store, eval_key, heads_key, gates_key)
        held = check_held_out(calibration, ev_labels, ev_probs, "entropy")
        if ev_probs is not None:
            held += check_held_out(calibration, ev_labels, ev_probs, "gate")
        calibration["held_out"] = held
        metrics["held_out_met"] = sum(r["met"] for r in held)
        metrics["held_out_checked"] = len(held)
    staging = store.staging("calibrate", plan.key)
    write_json_atomic(staging / "calibration.json", calibration)
    store.publish(Manifest(stage="calibrate", key=plan.key, config=plan.config, inputs=plan.inputs,
                           code_version=plan.code_version, metrics=metrics))
    return plan.key
