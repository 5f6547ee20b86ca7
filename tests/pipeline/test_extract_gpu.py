"""Extraction on CUDA, the path a large backbone takes: the backbone in bfloat16 (what
`model.dtype: auto` picks on a GPU) and in 8-bit and 4-bit through bitsandbytes, on tiny random
models of two layouts (Llama: model.layers, RMSNorm; GPT-2: transformer.h, LayerNorm with bias),
so nothing is downloaded. Skipped where no GPU is visible; `make test-gpu` runs only these."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flows.stages.base import StageContext, run_stage
from flows.stages.extract import ExtractStage, cache_path, load_teacher
from pipeline.backbone import load_backbone
from pipeline.config import load_config
from stores.artifacts import ArtifactStore
from stores.cache import CacheReader

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

FAMILIES = ("llama", "gpt2")
SEQ = 32


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, make_tiny_family, tmp_path_factory):
    return make_tiny_family(tmp_path_factory.mktemp(f"gpu-{request.param}"), request.param, num_layers=3, hidden=64)


def _cfg(model_dir, corpus, *extra: str):
    return load_config(None, [
        f"model.source={model_dir}", f"data.source={corpus}", f"data.seq_len={SEQ}", "extract.layers=[1,2,3]",
        "extract.batch_size=4", "extract.chunk_tokens=256", "extract.max_tokens=2048",
        "data.fractions={train: 0.6, calib: 0.2, eval: 0.2}", *extra,
    ])


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _extract(cfg, root):
    store = ArtifactStore(root)
    key = run_stage(ExtractStage("train"), StageContext(cfg, store, progress=False), {})
    return store, key, CacheReader(cache_path(store, key))


def test_auto_picks_cuda_bfloat16_and_cache_equals_output_hidden_states(tmp_path, family_dir, corpus_dir):
    cfg = _cfg(family_dir, corpus_dir)
    store, key, reader = _extract(cfg, tmp_path)
    extra = store.manifest("extract", key).extra
    assert extra["device"].startswith("cuda") and extra["dtype"] == "bfloat16"

    bb = load_backbone(cfg.model)
    ids = torch.from_numpy(reader.column("input_ids")[: 4 * SEQ].reshape(4, SEQ).astype(np.int64)).cuda()
    with torch.no_grad():
        ref = bb.model(ids, output_hidden_states=True).hidden_states  # same device, same dtype, same batch
    for layer in (1, 2, 3):
        want = ref[layer].reshape(-1, bb.hidden_size).float().cpu().numpy().astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(reader.hidden(f"layer_{layer}", slice(0, 4 * SEQ)), want)
    final = ref[-1].reshape(-1, bb.hidden_size).float().cpu().numpy().astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(reader.hidden("final", slice(0, 4 * SEQ)), final)
    # the shared teacher rebuilds the model's own logits from the cached final state
    teacher = load_teacher(store, key)
    with torch.no_grad():
        want_logits = bb.model(ids[:1]).logits[0].float().cpu()
    got_logits = teacher.logits(torch.from_numpy(reader.hidden("final", slice(0, SEQ))))
    assert _cosine(got_logits.numpy(), want_logits.numpy()) > 0.999


def test_bfloat16_cache_is_close_to_the_float32_cpu_cache(tmp_path, family_dir, corpus_dir):
    _, _, gpu = _extract(_cfg(family_dir, corpus_dir), tmp_path / "gpu")
    _, _, cpu = _extract(_cfg(family_dir, corpus_dir, "model.device=cpu", "model.dtype=float32"), tmp_path / "cpu")
    assert gpu.num_tokens == cpu.num_tokens
    for name in ("layer_1", "layer_3", "final"):
        a, b = gpu.hidden(name, slice(0, 512)), cpu.hidden(name, slice(0, 512))
        assert np.isfinite(a).all()
        assert _cosine(a, b) > 0.995, name


@pytest.mark.parametrize("quantization, min_cosine", [("8bit", 0.98), ("4bit", 0.9)])
def test_bitsandbytes_backbones_extract_close_to_float(tmp_path, family_dir, corpus_dir, quantization, min_cosine):
    """8-bit (LLM.int8) and 4-bit (nf4) weights: a different content key (the quantization is
    part of the model's identity), a finite cache near the float one, and a teacher whose LM
    head is the model's (dequantized where the head itself was quantized)."""
    base = _cfg(family_dir, corpus_dir, "model.device=cpu", "model.dtype=float32")
    quant = _cfg(family_dir, corpus_dir, f"model.quantization={quantization}")
    store_f, key_f, ref = _extract(base, tmp_path / "float")
    store_q, key_q, got = _extract(quant, tmp_path / quantization)
    assert key_q != key_f
    assert store_q.manifest("extract", key_q).config["model"]["quantization"] == quantization
    for name in ("layer_1", "layer_3", "final"):
        a = got.hidden(name, slice(0, 512))
        assert np.isfinite(a).all()
        assert _cosine(a, ref.hidden(name, slice(0, 512))) > min_cosine, (quantization, name)
    logits = load_teacher(store_q, key_q).logits(torch.from_numpy(got.hidden("final", slice(0, SEQ))))
    want = load_teacher(store_f, key_f).logits(torch.from_numpy(got.hidden("final", slice(0, SEQ))))
    assert _cosine(logits.numpy(), want.numpy()) > min_cosine
