"""The frozen backbone: loading, identity, and the hidden states every later stage consumes.

Every stage that touches the language model goes through :class:`Backbone`, so the questions
"which weights exactly?", "which layer is layer 6?" and "what does the teacher head look like?"
are answered in one place. The backbone is frozen: it is loaded in eval mode with gradients
off, and only ever run under ``torch.no_grad``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import nn

from pipeline.config import ModelConfig
from pipeline.fingerprint import sha256_file
from pipeline.model_files import (  # BackboneError and embedded_gguf_path are this module's API too
    BackboneError,
    ModelLocation,
    check_causal_lm,
    describe_damaged_weights,
    embedded_gguf_path,  # noqa: F401
    hash_weight_files,
    locate_model,
    read_model_facts,
)
from pipeline.norm import FINAL_NORM_NAMES, FinalNormSpec, NormError, describe_norm
from pipeline.teacher import TeacherWeights

if TYPE_CHECKING:  # transformers takes seconds to import; a cache-hit plan never needs it
    from transformers import (
        BitsAndBytesConfig,
        PreTrainedModel,
        PreTrainedTokenizerBase,
    )

log = logging.getLogger(__name__)

# Used when the config names no context length; large enough not to get in the way, and logged.
_FALLBACK_MAX_CONTEXT = 1 << 20
# Attribute names that hold the block list across HF architectures (Llama, Mistral, Qwen, OPT:
# layers; GPT-2, BLOOM, Falcon: h; ...); the final norm's are in pipeline.norm.
_LAYER_NAMES = ("layers", "h", "blocks", "layer")


def resolve_device(spec: str) -> torch.device:
    """Turn the config's device string into a device that exists on this machine.

    Fails here, at load time, rather than deep inside a forward pass on a missing GPU.
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError) as e:
        raise BackboneError(f"model.device {spec!r} is not a device; use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BackboneError(
                f"model.device {spec!r} asks for CUDA but none is available here; use model.device=auto or cpu"
            )
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise BackboneError(
                f"model.device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) present; "
                f"use cuda:0..cuda:{torch.cuda.device_count() - 1}"
            )
    elif device.type != "cpu":
        log.warning("device %s is neither cpu nor cuda; it is untested here", device)
    return device


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """Pick the compute dtype. `auto` is bfloat16 on CUDA (fp32 range, half the memory), float32 on
    CPU (CPU half-precision matmuls are slow and SmolLM2's ~23k activations are near fp16 limits)."""
    if spec == "auto":
        if device.type == "cuda":
            if torch.cuda.is_bf16_supported():
                return torch.bfloat16
            log.warning("this GPU has no bfloat16; auto dtype falls back to float16 (check for overflow)")
            return torch.float16
        return torch.float32
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if spec not in dtypes:
        raise BackboneError(f"model.dtype {spec!r} is unknown; use one of auto, {', '.join(dtypes)}")
    if device.type == "cpu" and spec != "float32":
        log.warning("model.dtype=%s on CPU is much slower than float32 on most CPUs", spec)
    return dtypes[spec]


@dataclass
class Backbone:
    """A loaded, frozen causal LM plus what later stages need to know about it.

    `identity` and `tokenizer_fingerprint` are the backbone's part of every content key: two
    backbones with the same identity produce the same hidden states.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    num_layers: int
    hidden_size: int
    vocab_size: int
    max_context: int
    device: torch.device
    dtype: torch.dtype
    identity: dict
    tokenizer_fingerprint: str
    _decoder: nn.Module = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._decoder = _find_decoder(self.model)

    @property
    def decoder(self) -> nn.Module:
        """The bare transformer (embeddings, blocks, final norm) without the LM head."""
        return self._decoder

    @property
    def final_norm(self) -> nn.Module:
        """The norm applied after the last block, as the backbone holds it."""
        return _find_attr(self._decoder, FINAL_NORM_NAMES, "final norm")

    def final_norm_spec(self) -> FinalNormSpec:
        """The final norm's exact description (kind, weight, bias, eps, offset), read by probing
        the module; what heads, the logit lens and gates rebuild."""
        try:
            return describe_norm(self.final_norm, self.hidden_size)
        except NormError as e:
            raise BackboneError(f"{type(self.model).__name__}: {e}") from e

    @property
    def lm_head(self) -> nn.Module:
        """The output projection to the vocabulary (tied to the embeddings for SmolLM2)."""
        head = self.model.get_output_embeddings()
        if head is None:
            raise BackboneError(f"{type(self.model).__name__} has no output embeddings; use a causal LM")
        return head

    def decoder_layers(self) -> nn.ModuleList:
        """The transformer blocks, in order, so a caller can run only the first k of them."""
        layers = _find_attr(self._decoder, _LAYER_NAMES, "decoder layers")
        if not isinstance(layers, nn.ModuleList):
            raise BackboneError(f"decoder layers of {type(self.model).__name__} are a {type(layers).__name__}, "
                                "not an nn.ModuleList; this architecture is not supported")
        return layers

    def check_layers(self, layers: Sequence[int]) -> None:
        """Exit layers must be 1..L-1: layer 0 is the embedding and layer L is the model's own output."""
        bad = [layer for layer in layers if not 1 <= int(layer) <= self.num_layers - 1]
        if bad:
            raise BackboneError(
                f"exit layers {bad} are outside 1..{self.num_layers - 1} for this {self.num_layers}-layer backbone; "
                f"pick 1-based decoder layers in that range, e.g. set extract.layers=[{max(1, self.num_layers // 4)}]"
            )

    def check_seq_len(self, seq_len: int) -> None:
        """Positions past the trained context give meaningless states; refuse them up front."""
        if seq_len > self.max_context:
            raise BackboneError(
                f"seq_len {seq_len} exceeds this backbone's context of {self.max_context} tokens; "
                f"set data.seq_len <= {self.max_context}"
            )

    @torch.no_grad()
    def hidden_states(self, input_ids: torch.Tensor,
                      layers: Sequence[int]) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Hidden states after the given blocks, plus the final-norm state the LM head reads.

        Only the decoder runs: the teacher logits are recomputed from the final state when needed,
        and the LM head is a fifth of a small model's cost.
        """
        self.check_layers(layers)
        self.check_seq_len(input_ids.shape[-1])
        input_ids = input_ids.to(self.device)  # [batch, seq]
        out = self._decoder(input_ids=input_ids, output_hidden_states=True, use_cache=False, return_dict=True)
        states = out.hidden_states  # L+1 × [batch, seq, hidden]: embeddings, then each block's output
        if len(states) != self.num_layers + 1:
            raise BackboneError(
                f"{type(self.model).__name__} returned {len(states)} hidden states, expected {self.num_layers + 1}; "
                "this architecture does not report one state per layer"
            )
        # The last entry has the final norm applied (logits == lm_head(states[-1])).
        return {int(layer): states[int(layer)] for layer in layers}, states[-1]

    @torch.no_grad()
    def forward_bare(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The decoder with nothing extra kept: the baseline cost that early exits are measured against."""
        input_ids = input_ids.to(self.device)  # [batch, seq]
        out = self._decoder(input_ids=input_ids, use_cache=False, return_dict=True)
        return out.last_hidden_state  # [batch, seq, hidden], final norm applied

    def teacher_weights(self) -> TeacherWeights:
        """The final norm, exactly as the backbone defines it, and the LM head as float32 CPU
        tensors: heads train from the cache without the backbone in memory, and need both to
        compute teacher logits and to start at the logit lens. Save with `to_state`."""
        bias = getattr(self.lm_head, "bias", None)  # [vocab] or None
        return TeacherWeights.from_norm(self.final_norm_spec(), _dequantized_weight(self.lm_head), bias)


def _find_decoder(model: nn.Module) -> nn.Module:
    """The module that maps input ids to the final-norm state; `get_decoder` covers most HF models."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or decoder is model:
        decoder = getattr(model, "base_model", None)
    if decoder is None or decoder is model:
        raise BackboneError(f"cannot find the decoder inside {type(model).__name__}; use a causal LM")
    return decoder


def _find_attr(module: nn.Module, names: Sequence[str], what: str) -> nn.Module:
    for name in names:
        found = getattr(module, name, None)
        if isinstance(found, nn.Module):
            return found
    raise BackboneError(f"cannot find the {what} of {type(module).__name__} (looked for {', '.join(names)}); "
                        "this architecture is not supported")


def _dequantized_weight(module: nn.Module) -> torch.Tensor:
    """A module's weight as a float32 CPU tensor, undoing bitsandbytes quantization if present.

    transformers keeps the LM head and norms unquantized by default, but a custom
    `llm_int8_skip_modules` can quantize the head; the teacher must still be exact floats.
    """
    weight = module.weight
    kind = type(weight).__name__
    if kind == "Params4bit":
        import bitsandbytes.functional as bnbf

        w = bnbf.dequantize_4bit(weight.data, weight.quant_state)
    elif kind == "Int8Params" and weight.dtype == torch.int8:
        scale = getattr(weight, "SCB", None)
        if scale is None:
            raise BackboneError(f"8-bit weight of {type(module).__name__} has no scale (SCB); cannot de-quantize it")
        w = weight.data.float() * (scale.float().unsqueeze(1) / 127.0)  # [out, in] * [out, 1]
    else:
        w = weight.detach()
    return w.float().cpu().contiguous()


def _tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of everything that decides token ids: vocab, merges, normalizer, pre-tokenizer, special tokens.

    Padding/truncation settings are dropped: they change at run time without changing tokenization.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
    else:
        spec = {"vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])}
    spec["special"] = sorted((str(k), str(v)) for k, v in tokenizer.special_tokens_map.items())
    spec["special_ids"] = sorted(tokenizer.all_special_ids)
    blob = json.dumps(spec, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()


def _max_context(config) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    log.warning("model config names no context length; assuming %d tokens, check data.seq_len yourself",
                _FALLBACK_MAX_CONTEXT)
    return _FALLBACK_MAX_CONTEXT


def _quantization_config(cfg: ModelConfig, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    if cfg.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig
    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


class _DropInt8CastWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "inputs will be cast from" not in record.getMessage()


def _quiet_int8_cast_warning() -> None:
    """bitsandbytes logs "MatMul8bitLt: inputs will be cast ... to float16" on every 8-bit matmul
    (28 lines per forward of a 4-layer model); it is expected for int8, so say it once instead."""
    bnb_log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropInt8CastWarning) for f in bnb_log.filters):
        bnb_log.addFilter(_DropInt8CastWarning())
        log.info("8-bit matmuls cast their inputs to float16 (bitsandbytes int8); that warning is silenced")


def _resolve_hub_revision(repo_id: str, revision: str | None) -> str:
    """The immutable commit a hub revision points to, from the hub or the local cache.

    Resolving first pins every file of the load to one commit, gives the cache key its identity,
    and fails fast (no retry loop) when the id is unknown or the hub is unreachable.
    """
    import huggingface_hub

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        resolved = huggingface_hub.resolve_revision(repo_id, revision=revision, local_files_only=offline)
    except Exception as e:  # RevisionResolutionError, HTTP errors, offline mode: all mean "not reachable"
        raise BackboneError(
            f"model {repo_id!r} (revision {revision or 'main'}) was not found locally or on the Hugging Face hub "
            f"({e}); check the id, download it while online, or pass a local model folder as model.source"
        ) from e
    return getattr(resolved, "resolved", None) or str(resolved)


@dataclass(frozen=True)
class _Resolved:
    """Where a configured backbone's files are, and its identity, found without loading it."""

    loc: ModelLocation
    revision: str | None
    identity: dict
    load_kwargs: dict
    device: torch.device
    dtype: torch.dtype


def _resolve(cfg: ModelConfig, file_hasher: Callable[[Path], str]) -> _Resolved:
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    source = cfg.source
    loc = locate_model(cfg)
    kind, location, gguf_file = loc.kind, loc.location, loc.gguf_file
    revision = _resolve_hub_revision(source, cfg.revision) if kind == "hub" else None

    # Local weights are identified by content alone, so the same files moved to another place,
    # name or machine keep their cache keys.
    identity: dict = {"source": source if kind in ("embedded", "hub") else None, "kind": kind, "quantization": cfg.quantization,
                      "dtype": str(dtype).removeprefix("torch."), "gguf_file": gguf_file}
    if kind == "hub":
        identity["revision"] = revision
    else:
        identity["weights"] = hash_weight_files(Path(location), gguf_file, file_hasher)

    common = {"trust_remote_code": cfg.trust_remote_code}
    if gguf_file:
        common["gguf_file"] = gguf_file
    if revision is not None:
        common["revision"] = revision
    return _Resolved(loc, revision, identity, common, device, dtype)


def model_identity(cfg: ModelConfig, file_hasher: Callable[[Path], str] = sha256_file) -> dict:
    """The backbone's identity for content keys (weight hashes or hub commit, quantization,
    dtype), without loading the weights: a cache-hit check must take seconds."""
    return _resolve(cfg, file_hasher).identity


def load_tokenizer(cfg: ModelConfig) -> tuple[PreTrainedTokenizerBase, str]:
    """The backbone's tokenizer and its fingerprint, without loading the weights."""
    tokenizer = _load_tokenizer(cfg.source, _resolve(cfg, lambda path: ""))
    return tokenizer, _tokenizer_fingerprint(tokenizer)


def _load_tokenizer(source: str, r: _Resolved) -> PreTrainedTokenizerBase:
    try:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(r.loc.location, **r.load_kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise BackboneError(
            f"could not load the tokenizer of {source!r}: {e}; the model needs its tokenizer files "
            "(tokenizer.json / tokenizer_config.json) beside the weights"
        ) from e


def load_backbone(cfg: ModelConfig, file_hasher: Callable[[Path], str] = sha256_file) -> Backbone:
    """Load the backbone named by `cfg`, frozen, on the configured device, with its identity.

    `file_hasher` lets a caller reuse hashes (e.g. keyed by path, size and mtime) for multi-GB files.
    """
    r = _resolve(cfg, file_hasher)
    kind, location, identity, common, device, dtype = r.loc.kind, r.loc.location, r.identity, r.load_kwargs, r.device, r.dtype
    source = cfg.source
    check_causal_lm(read_model_facts(r.loc, r.revision), source)  # a BERT folder fails here, not at its missing blocks
    quant = _quantization_config(cfg, dtype)
    if cfg.quantization == "8bit":
        _quiet_int8_cast_warning()

    log.info("loading backbone %s (%s) on %s as %s%s", source, kind, device, identity["dtype"],
             f", {cfg.quantization}" if quant else "")
    tokenizer = _load_tokenizer(source, r)
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM
    try:
        if quant is not None:
            model = AutoModelForCausalLM.from_pretrained(
                location, dtype=dtype, quantization_config=quant, device_map={"": device}, **common
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **common).to(device)
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise BackboneError(f"could not load model {source!r} ({kind}): {e}") from e
    except SafetensorError as e:
        raise BackboneError(describe_damaged_weights(r.loc, e)) from e

    model.eval()
    model.requires_grad_(False)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head = model.get_output_embeddings()
    num_layers = len(_find_attr(_find_decoder(model), _LAYER_NAMES, "decoder layers"))
    declared = getattr(config, "num_hidden_layers", num_layers)
    if declared != num_layers:
        raise BackboneError(f"config declares {declared} layers but the decoder holds {num_layers}; "
                            "this architecture is not supported")
    backbone = Backbone(model=model, tokenizer=tokenizer, num_layers=num_layers, hidden_size=int(config.hidden_size),
                        vocab_size=int(getattr(head, "out_features", None) or config.vocab_size),
                        max_context=_max_context(config), device=device, dtype=dtype, identity=identity,
                        tokenizer_fingerprint=_tokenizer_fingerprint(tokenizer))
    # Fail now, not mid-extraction, if the blocks are not a ModuleList or the final norm cannot be rebuilt.
    backbone.decoder_layers()
    backbone.final_norm_spec()
    log.info("backbone ready: %d layers, hidden %d, vocab %d, context %d",
             backbone.num_layers, backbone.hidden_size, backbone.vocab_size, backbone.max_context)
    return backbone
