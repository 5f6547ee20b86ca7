"""Typed configuration for every stage.

One YAML file holds all sections; YAML is only data. Validation collects every problem at
once and raises a single :class:`ConfigError` whose message names each bad value and its fix.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.corpora import PYTHON_DOCS as EMBEDDED_CORPUS

EMBEDDED_MODEL = "embedded:smollm2"


class ConfigError(ValueError):
    """The configuration is invalid; the message lists every problem and how to fix it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class ModelConfig(_Section):
    """The frozen backbone: which model, in which dtype, on which device."""

    source: str = EMBEDDED_MODEL
    """Backbone: `embedded:smollm2` (ships with the package), a local folder, a `.gguf` file, or a hub id."""
    gguf_file: str | None = None
    """GGUF file name inside `source` when `source` is a folder or hub id holding GGUF weights."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to load; pin a commit for reproducible cache keys."""
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """Compute dtype. `auto`: bfloat16 on CUDA, float32 on CPU."""
    quantization: Literal["none", "8bit", "4bit"] = "none"
    """bitsandbytes weight quantization: 8-bit (LLM.int8) or 4-bit (nf4)."""
    device: str = "auto"
    """`auto` (CUDA when present, else CPU), `cpu`, `cuda` or `cuda:N`."""
    trust_remote_code: bool = False
    """Run model code shipped with a hub repository. Off unless you trust its author."""


class DataConfig(_Section):
    """The corpus and how its documents split into train, calib and eval."""

    source: str = EMBEDDED_CORPUS
    """Corpus: `embedded:python-docs` (the Python language reference and the standard library's
    docstrings), `embedded:pydoc` (the reference alone), a local file or folder
    (txt, json/jsonl, parquet, csv), or a Hugging Face dataset name."""
    name: str | None = None
    """Dataset configuration name for hub datasets (e.g. `wikitext-2-raw-v1`)."""
    hub_split: str = "train"
    """Split of the source dataset to read before our own train/calib/eval split."""
    text_column: str = "text"
    """Column holding the text, for tabular sources."""
    seq_len: int = Field(256, gt=1)
    """Tokens per packed sequence."""
    fractions: dict[str, float] = Field({"train": 0.3, "calib": 0.35, "eval": 0.35})
    """Share of documents in each split; documents never cross splits. Calib and eval are large
    because the strict levels need it: certifying 0.99 needs hundreds of exited calib tokens with
    almost no error, and a held-out check sees a 2-point miss only with thousands of exits (README,
    "Calibration data")."""
    seed: int = 0
    """Seed of the document shuffle that assigns documents to splits."""
    max_documents: int | None = Field(None, gt=0)
    """Use only the first N documents (after sorting); for quick runs."""

    @field_validator("fractions")
    @classmethod
    def _check_fractions(cls, v: dict[str, float]) -> dict[str, float]:
        missing = {"train", "calib", "eval"} - set(v)
        if missing:
            raise ValueError(f"fractions lacks {sorted(missing)}; give all of train, calib, eval")
        if any(f < 0 for f in v.values()) or abs(sum(v.values()) - 1.0) > 1e-6:
            raise ValueError(f"fractions {v} must be non-negative and sum to 1")
        return v


class ExtractConfig(_Section):
    """Which layers' hidden states the extract stage caches, and how."""

    split: Literal["train", "calib", "eval"] = "train"
    """Which of our splits to extract."""
    layers: list[int] = Field([6, 12, 18, 24])
    """Exit layers (1-based decoder layer outputs, 1..L-1); the final-norm state is always stored."""
    storage_dtype: Literal["float16", "bfloat16", "int8"] = "float16"
    """Cache dtype: float16 (checked for overflow), bfloat16 (as uint16 bits), or int8 with a per-token scale."""
    batch_size: int = Field(8, gt=0)
    """Sequences per backbone forward."""
    chunk_tokens: int = Field(4096, gt=0)
    """Target rows per zarr chunk; rounded to a whole number of sequences."""
    max_tokens: int | None = Field(None, gt=0)
    """Extract at most this many tokens of the split (whole sequences); for quick runs."""
    workers: int = Field(1, ge=1)
    """Above 1: shard the split over a Dask LocalCluster of this many single-threaded worker processes."""
    cluster: str | None = None
    """Address of a running Dask scheduler (e.g. tcp://host:8786) to shard over its workers instead."""

    @field_validator("layers")
    @classmethod
    def _check_layers(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("layers is empty; give at least one exit layer, e.g. [6, 12]")
        if len(set(v)) != len(v):
            raise ValueError(f"layers {v} has duplicates")
        if any(layer < 1 for layer in v):
            raise ValueError(f"layers {v}: exit layers are 1-based decoder layers, use values >= 1")
        return sorted(v)


class HeadsConfig(_Section):
    """Early-exit heads: one per exit layer, trained to match the final layer."""

    layers: list[int] | None = None
    """Exit layers to train heads for; default: every layer in the cache (online: extract.layers)."""
    mode: Literal["offline", "online"] = "offline"
    """`offline`: train from the hidden-state cache. `online`: run the backbone every step
    instead (no train cache on disk; every epoch pays a full backbone pass)."""
    kind: Literal["linear", "adapter"] = "adapter"
    """`linear`: norm + full-vocabulary projection initialised from the LM head.
    `adapter`: norm + low-rank residual map into the frozen, shared LM head."""
    rank: int = Field(64, gt=0)
    """Rank of the adapter's residual map."""
    loss: Literal["kl", "ce", "mix"] = "kl"
    """KL distillation to the final layer, cross-entropy to the true token, or a mix."""
    ce_weight: float = Field(0.5, ge=0, le=1)
    """Weight of cross-entropy in the `mix` loss (KL gets 1 - ce_weight)."""
    temperature: float = Field(1.0, gt=0)
    """Distillation temperature."""
    layer_weights: Literal["uniform", "proportional"] = "uniform"
    """`proportional`: weight head i by (i+1)/L across heads."""
    efficient_loss: bool = True
    """Score only the teacher's top-k (from the teacher_topk stage) plus sampled negatives
    instead of the full vocabulary; false: the exact full-vocabulary loss (slower)."""
    topk: int = Field(16, gt=0)
    """Teacher candidates kept per row by the efficient loss (its top-k by probability)."""
    negatives: int = Field(1536, ge=0)
    """Distinct negative tokens per batch for the efficient loss, shared by its rows."""
    negative_proposal: Literal["frequency", "uniform"] = "frequency"
    """Where negatives are drawn from: `frequency`, in proportion to the teacher's probability
    mass per token (flattened by `proposal_power`, a quarter spread evenly), estimated once
    from the teacher's top-k of a sample of rows; `uniform`, every token alike."""
    proposal_power: float = Field(0.5, ge=0, le=1)
    """Exponent on the token mass in the `frequency` proposal: 1 follows the teacher's
    marginal, 0 is uniform."""
    epochs: int = Field(2, gt=0)
    """Passes over the train cache."""
    batch_tokens: int = Field(1024, gt=0)
    """Tokens per optimizer step."""
    lr: float = Field(3e-3, gt=0)
    """Peak AdamW learning rate (after warm-up; cosine decay to the end)."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW weight decay."""
    warmup_steps: int = Field(20, ge=0)
    """Optimizer steps of linear learning-rate warm-up."""
    grad_clip: float = Field(1.0, gt=0)
    """Gradient norm clip."""
    buffer_chunks: int = Field(4, gt=0)
    """Chunks held in memory by the shuffling reader."""
    seed: int = 0
    """Seed of the head initialisation, batch order and sampled negatives."""
    max_steps: int | None = Field(None, gt=0)
    """Stop after this many optimizer steps (per epoch budget is then spread evenly)."""


class GatesConfig(_Section):
    """Exit gates: one small network per head that learns when its head may answer."""

    features: Literal["hidden", "hidden+confidence", "hidden+confidence+change"] = "hidden+confidence"
    """What a gate reads. `hidden`: the normalised hidden state only. `hidden+confidence`: also
    its head's entropy, top-1 probability and top-1/top-2 probability margin, standardised (free
    at exit time: the head's logits are computed anyway). `hidden+confidence+change`: also
    whether the head's top-1 differs from the previous exit head's."""
    hidden_ratio: int = Field(4, gt=0)
    """Gate hidden width is hidden_size // hidden_ratio."""
    sampling: Literal["straight_through", "gumbel"] = "straight_through"
    """How exit decisions are sampled during training."""
    tau_forward: float = Field(1.0, gt=0)
    """Gumbel-softmax forward temperature."""
    tau_backward: float = Field(1.0, gt=0)
    """Gumbel-softmax backward temperature."""
    routing_weight: float = Field(0.0, ge=0)
    """λ_r of the routing loss MSE(expected exit layer, target exit layer); 0 disables it."""
    threshold: float = Field(0.5, gt=0, lt=1)
    """Inference exit threshold on p_exit."""
    epochs: int = Field(2, gt=0)
    """Passes over the gates' train tokens."""
    batch_tokens: int = Field(2048, gt=0)
    """Tokens per optimizer step."""
    lr: float = Field(1e-3, gt=0)
    """Peak AdamW learning rate (after warm-up; cosine decay to the end)."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW weight decay."""
    warmup_steps: int = Field(20, ge=0)
    """Optimizer steps of linear learning-rate warm-up."""
    grad_clip: float = Field(1.0, gt=0)
    """Gradient norm clip."""
    buffer_chunks: int = Field(4, gt=0)
    """Chunks held in memory by the shuffling reader."""
    seed: int = 0
    """Seed of the gate initialisation, batch order and exit samples."""
    max_steps: int | None = Field(None, gt=0)
    """Stop after this many optimizer steps (per epoch budget is then spread evenly)."""
    max_tokens: int | None = Field(None, gt=0)
    """Gates learn from at most this many train tokens: labelling a token costs every head a
    full-vocabulary pass, and a gate has ~H^2/4 parameters. None: all tokens."""


class CalibrateConfig(_Section):
    """Exit thresholds per head and accuracy level, with a statistical guarantee."""

    levels: list[float] = Field([0.75, 0.85, 0.90, 0.95, 0.99])
    """Target accuracies of exited tokens."""
    delta: float = Field(0.1, gt=0, lt=1)
    """Allowed probability that the guarantee fails (accuracy below target on new data)."""
    method: Literal["ltt", "empirical"] = "ltt"
    """`ltt`: Learn-then-Test with a binomial bound (guaranteed); `empirical`: plain fit."""
    reference: Literal["final", "true"] = "final"
    """Accuracy against the final layer's top-1 (`final`) or the true next token (`true`)."""
    max_tokens: int | None = Field(None, gt=0)
    """Use at most this many calib tokens."""
    learn_fraction: float = Field(0.2, ge=0, lt=1)
    """Share of calib tokens that choose the candidate thresholds (Learn-then-Test); the rest test them."""
    grid_size: int = Field(200, gt=1)
    """Candidate thresholds per head."""
    seed: int = 0
    """Seed of the learn/test split of the calib tokens."""

    @field_validator("levels")
    @classmethod
    def _check_levels(cls, v: list[float]) -> list[float]:
        bad = [x for x in v if not 0 < x < 1]
        if bad:
            raise ValueError(f"accuracy levels {bad} are outside (0, 1); use e.g. 0.9 for 90 %")
        if not v:
            raise ValueError("levels is empty; give e.g. [0.9, 0.95]")
        return sorted(v)


class EvaluateConfig(_Section):
    """Held-out evaluation: head quality, guarantees, cascade savings and decoding speed."""

    max_tokens: int | None = Field(None, gt=0)
    """Score at most this many eval tokens (None: the whole eval cache)."""
    decode: bool = True
    """Also generate with the heads (self-speculative and plain greedy, same prompts) and
    compare speed and output; loads the backbone."""
    prompts: int = Field(4, gt=0)
    """Prompts drawn from the eval documents (seeded) for the decoding comparison."""
    prompt_tokens: int = Field(64, gt=0)
    """Tokens per prompt."""
    new_tokens: int = Field(32, gt=0)
    """Tokens generated per prompt."""
    exit_layers: list[int] | None = None
    """Draft exit layers to compare; None: every head's layer in the lower half of the model."""
    draft_lens: list[int] = Field([2, 4])
    """Fixed draft lengths k to compare (each >= 1); an adaptive draft (up to the largest k,
    stopped by the head's calibrated entropy threshold) runs beside them."""
    draft_level: float | None = Field(None, gt=0, lt=1)
    """Calibrated level whose entropy thresholds stop adaptive drafts and early exits; must be
    one of calibrate.levels. None: 0.9 when calibrated, else the nearest calibrated level."""
    draft_vocab: int | None = Field(4096, gt=0)
    """Reduced draft vocabulary: the N most frequent teacher top-1 tokens of the train cache;
    None: the full vocabulary."""
    seed: int = 0
    """Seed of the prompt draw."""

    @field_validator("draft_lens")
    @classmethod
    def _check_draft_lens(cls, v: list[int]) -> list[int]:
        if not v or any(k < 1 for k in v):
            raise ValueError(f"draft_lens {v}: give draft lengths >= 1, e.g. [2, 4]")
        return sorted(set(v))


class QuantizeConfig(_Section):
    """Retraining of the trained heads (and gates) as ternary BitNet b1.58 networks: every
    linear map becomes a `pipeline.ternary.BitLinear` initialised from the trained float
    weights, then trained with the heads' own loss (gates: their joint loss) plus λ_q times
    the quantization loss."""

    hadamard: bool = False
    """Rotate each BitLinear's input by a Hadamard transform before the 8-bit activation
    quantization (H-BitLinear): spreads outlier dimensions over all of them."""
    quant_weight: float = Field(0.0, ge=0)
    """λ_q of the quantization loss MSE(latent float weights, their ternary values), pulling the
    latent weights onto the grid; 0: only the task loss trains them (through the straight-through
    estimator), however far from the grid they drift."""
    routing_weight: float = Field(0.0, ge=0)
    """λ_r of the gates' routing loss MSE(expected exit layer, oracle exit layer) while the
    ternary gates retrain; 0 disables it."""
    epochs: int = Field(2, gt=0)
    """Passes over the train cache, for the heads and again for the gates."""
    batch_tokens: int = Field(1024, gt=0)
    """Tokens per optimizer step."""
    lr: float = Field(3e-3, gt=0)
    """Peak AdamW learning rate on the latent float weights (after warm-up; cosine decay). A
    ternary weight changes only when its latent value crosses a rounding edge, so too small a
    rate leaves the rounded network where initialisation put it (benchmarks/results/quantize.md)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay of the latent matrices; it shrinks them toward the ternary zero."""
    warmup_steps: int = Field(20, ge=0)
    """Optimizer steps of linear learning-rate warm-up."""
    grad_clip: float = Field(1.0, gt=0)
    """Gradient norm clip."""
    buffer_chunks: int = Field(4, gt=0)
    """Chunks held in memory by the shuffling reader."""
    max_steps: int | None = Field(None, gt=0)
    """Stop after this many optimizer steps (per epoch budget is then spread evenly)."""
    seed: int = 0
    """Seed of the batch order, negatives and exit samples."""
    quant_warmup_steps: int = Field(0, ge=0)
    """Phase quantization in: over these first steps each ternary layer's output moves linearly
    from its float value to its quantized one; 0: quantized from the first step."""
    gates: bool = True
    """Also retrain the gates as ternary networks (on the ternary heads' labels)."""


class InputsConfig(_Section):
    """Explicit upstream artifacts (a key or a unique prefix, as `exitflow ls` shows) to use
    instead of the ones the rest of the config implies. Unset: derived from the config."""

    train_cache: str | None = None
    """Train split cache to train from: an artifact key or unique prefix, `current` or `latest`."""
    calib_cache: str | None = None
    """Calibration split cache: a key or prefix, `current` (the calibration in service) or `latest`."""
    eval_cache: str | None = None
    """Eval split cache for held-out numbers: a key or prefix, `current` or `latest`."""
    heads: str | None = None
    """Trained heads to use instead of training: a key or prefix, `current` or `latest`."""
    gates: str | None = None
    """Trained gates to use instead of training: a key or prefix, `current` or `latest`."""


class Config(_Section):
    inputs: InputsConfig = Field(default_factory=InputsConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    heads: HeadsConfig = Field(default_factory=HeadsConfig)
    gates: GatesConfig = Field(default_factory=GatesConfig)
    calibrate: CalibrateConfig = Field(default_factory=CalibrateConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key; `exitflow config` lists every key with its default and meaning"
        lines.append(f"  - {where} = {e.get('input')!r}: {msg}")
    return f"invalid configuration ({len(lines)} problem{'s' * (len(lines) != 1)}):\n" + "\n".join(lines)


def _parse_value(text: str) -> Any:
    """Parse a `--set` value as YAML so `8`, `true`, `[6, 12]` get their types."""
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` overrides to a raw config mapping (a copy is returned)."""
    data = copy.deepcopy(data)
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"  - override {item!r}: expected section.key=value, e.g. extract.batch_size=4")
            continue
        path, value = item.split("=", 1)
        parts = path.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"  - override {item!r}: {part!r} is not a section")
                break
        else:
            # artifact keys are hex: one that happens to be all digits must stay a string
            node[parts[-1]] = value.strip() if parts[0] == "inputs" else _parse_value(value)
    if problems:
        raise ConfigError("invalid overrides:\n" + "\n".join(problems))
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                sections: dict[str, BaseModel | dict] | None = None) -> Config:
    """Read a YAML config (or the defaults), apply `sections`, then `overrides`, and validate
    everything at once.

    `sections` are typed sections as a run form submits them (every field filled in): only
    the fields that differ from their defaults apply, so a field left at its default keeps
    the config file's value.
    """
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist; give the path of an existing YAML file (relative to the working folder)")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, not {type(data).__name__}")
    for name, section in (sections or {}).items():
        if name not in Config.model_fields:
            raise ConfigError(f"unknown config section {name!r}; the sections are {list(Config.model_fields)}")
        if isinstance(section, dict):
            section = _validated_section(name, section)
        data = _deep_merge(data, {name: section.model_dump(mode="json", exclude_defaults=True)})
    data = apply_overrides(data, overrides or [])
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e)) from None


def _validated_section(name: str, values: dict) -> BaseModel:
    try:
        return Config.model_fields[name].annotation.model_validate(values)
    except ValidationError as e:
        raise ConfigError(_format_errors(e).replace("  - ", f"  - {name}.")) from None


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def canonical(section: BaseModel) -> dict:
    """The JSON-able form of a config section used in content keys."""
    return section.model_dump(mode="json")
