"""Shared fixtures: a tiny random Llama with its own tokenizer, saved as a local HF folder.

Tests load it through the same code path a user's local model takes, so nothing here
needs the network or the embedded 135M model.
"""

from __future__ import annotations

import os
from pathlib import Path

# Before anything imports huggingface_hub / datasets: they read these once, at import.
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline: telemetry only logs errors
os.environ.setdefault("DO_NOT_TRACK", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# The tiny test model's matmuls are microseconds of work: with more than one OpenMP thread
# they spend milliseconds synchronising, 100x more on a loaded machine.
torch.set_num_threads(1)


def _corpus_texts(n: int = 40) -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)[:n]]


def _build_tokenizer(out: Path):
    """A small BPE tokenizer trained on the embedded corpus, saved into `out`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(_corpus_texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out)
    return fast


def build_tiny_model(out: Path, num_layers: int = 4, hidden: int = 64, seed: int = 0) -> Path:
    """Write a tiny random LlamaForCausalLM + trained BPE tokenizer into `out`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    fast = _build_tokenizer(out)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    return out


NORM_FAMILIES = ("llama", "gpt2", "cohere", "gemma")
"""Tiny model layouts covering every final-norm convention heads must rebuild: RMSNorm (Llama),
LayerNorm with bias (GPT-2: transformer.h, ln_f), LayerNorm without bias (Cohere's
CohereLayerNorm) and RMSNorm scaled by 1 + weight (Gemma)."""


def build_tiny_family(out: Path, family: str, num_layers: int = 3, hidden: int = 64, seed: int = 0) -> Path:
    """Write a tiny random causal LM of `family` (see NORM_FAMILIES) + tokenizer into `out`.

    Every norm's weight and bias is set to random non-trivial values (weight ~ 1 + 0.5 randn,
    bias ~ 0.3 randn), so a head that rebuilt the wrong norm cannot match by accident.
    """
    import torch
    import transformers as tf

    fast = _build_tokenizer(out)
    common = dict(vocab_size=len(fast), bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                  tie_word_embeddings=True)
    decoder = dict(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=num_layers,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    if family == "llama":
        model_cls, cfg = tf.LlamaForCausalLM, tf.LlamaConfig(**common, **decoder)
    elif family == "gpt2":
        model_cls = tf.GPT2LMHeadModel
        cfg = tf.GPT2Config(**common, n_embd=hidden, n_layer=num_layers, n_head=4, n_positions=512)
    elif family == "cohere":
        model_cls, cfg = tf.CohereForCausalLM, tf.CohereConfig(**common, **decoder, logit_scale=0.5)
    elif family == "gemma":
        model_cls, cfg = tf.GemmaForCausalLM, tf.GemmaConfig(**common, **decoder, head_dim=hidden // 4)
    else:
        raise ValueError(f"unknown family {family!r}; use one of {NORM_FAMILIES}")
    torch.manual_seed(seed)
    model = model_cls(cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, module in model.named_modules():
            if "norm" not in type(module).__name__.lower() and not name.split(".")[-1].startswith("ln"):
                continue
            for pname, p in module.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=gen)
                p.copy_(1.0 + 0.5 * noise if pname == "weight" else 0.3 * noise)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def make_tiny_model():
    """`build_tiny_model` for tests that need a second, different backbone."""
    return build_tiny_model


@pytest.fixture(scope="session")
def make_tiny_family():
    """`build_tiny_family`: tiny random models of every final-norm convention."""
    return build_tiny_family


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """A local folder of .txt documents (a slice of the embedded corpus)."""
    d = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(_corpus_texts(30)):
        (d / f"doc{i:03d}.txt").write_text(text)
    return d


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def memory_url(tmp_path, monkeypatch):
    """A fresh memory:// artifact root (one per test, removed after it) and its mirror folder
    under tmp_path."""
    import uuid

    import fsspec

    from stores.remote import MIRROR_ENV

    monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "mirror"))
    name = f"exitflow-test-{uuid.uuid4().hex[:12]}"
    yield f"memory://{name}/root"
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/{name}"):
        fs.rm(f"/{name}", recursive=True)
