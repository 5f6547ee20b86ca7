"""The backbone's own final norm, on every family: read exactly, saved and restored exactly, and
applied by the logit lens, untrained heads and gates so that they equal the backbone's
`lm_head(final_norm(h))`. The GPT-2 case failed before norms were read from the backbone (heads
assumed an RMSNorm without bias)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from pipeline.backbone import Backbone, BackboneError, load_backbone
from pipeline.config import GatesConfig, HeadsConfig, ModelConfig
from pipeline.gates import build_gates
from pipeline.heads import build_heads
from pipeline.norm import FinalNorm, FinalNormSpec, NormError, describe_norm
from pipeline.teacher import TeacherStateError, TeacherWeights

# family -> (kind, weight offset, has bias, final norm's class)
EXPECTED = {
    "llama": ("rms", 0.0, False, "LlamaRMSNorm"),
    "gpt2": ("layer", 0.0, True, "LayerNorm"),
    "cohere": ("layer", 0.0, False, "CohereLayerNorm"),
    "gemma": ("rms", 1.0, False, "GemmaRMSNorm"),
}
FAMILIES = list(EXPECTED)


@pytest.fixture(scope="module")
def backbones(tmp_path_factory, make_tiny_family) -> dict[str, Backbone]:
    return {f: load_backbone(ModelConfig(source=str(make_tiny_family(tmp_path_factory.mktemp(f), f))))
            for f in FAMILIES}


def _states(backbone: Backbone) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    ids = torch.randint(0, backbone.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    return backbone.hidden_states(ids, list(range(1, backbone.num_layers)))


def _own_lens(backbone: Backbone, h: torch.Tensor) -> torch.Tensor:
    """The backbone's own logit lens, through its own modules: lm_head(final_norm(h))."""
    with torch.no_grad():
        return backbone.lm_head(backbone.final_norm(h))  # [n, V]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_norm_is_read_exactly(backbones, family):
    b = backbones[family]
    kind, offset, has_bias, cls = EXPECTED[family]
    assert type(b.final_norm).__name__ == cls
    spec = b.final_norm_spec()
    assert (spec.kind, spec.weight_offset, spec.bias is not None) == (kind, offset, has_bias)
    torch.testing.assert_close(spec.weight, b.final_norm.weight.float(), rtol=0, atol=0)
    tw = b.teacher_weights()
    assert (tw.norm_kind, tw.norm_weight_offset, tw.norm_eps) == (kind, offset, spec.eps)
    assert tw.final_norm.data_ptr() != b.final_norm.weight.data_ptr(), "the teacher must not alias the backbone"
    if has_bias:
        torch.testing.assert_close(tw.final_norm_bias, b.final_norm.bias, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_final_state_is_the_norm_of_the_last_block(backbones, family):
    """What the cache stores as `final` is the backbone's final norm applied to its last block."""
    b = backbones[family]
    seen = []
    hook = b.final_norm.register_forward_hook(lambda mod, args, out: seen.append((args[0], out)))
    try:
        _, final = _states(b)
    finally:
        hook.remove()
    pre, out = seen[-1]
    torch.testing.assert_close(final, out)
    torch.testing.assert_close(b.teacher_weights().apply_norm(pre), final, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_lens_and_untrained_heads_equal_the_backbones_own_lens(backbones, family):
    b = backbones[family]
    teacher = b.teacher_weights()
    states, _ = _states(b)
    layers = sorted(states)
    lens = build_heads(HeadsConfig(kind="adapter", rank=1), layers, teacher)  # the project's logit lens
    linear = build_heads(HeadsConfig(kind="linear"), layers, teacher)
    adapter = build_heads(HeadsConfig(kind="adapter", rank=8), layers, teacher)
    with torch.no_grad():
        for layer in layers:
            h = states[layer].reshape(-1, b.hidden_size)  # [n, H]
            want = _own_lens(b, h)  # [n, V]
            torch.testing.assert_close(teacher.lens_logits(h), want, atol=1e-5, rtol=1e-5)
            for heads in (lens, linear, adapter):
                torch.testing.assert_close(heads[str(layer)](h), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_gates_normalise_with_the_same_norm(backbones, family):
    b = backbones[family]
    teacher = b.teacher_weights()
    gates = build_gates(GatesConfig(), [1], teacher)
    h = _states(b)[0][1].reshape(-1, b.hidden_size)  # [n, H]
    assert isinstance(gates["1"].norm, FinalNorm)
    with torch.no_grad():
        torch.testing.assert_close(gates["1"].norm(h), b.final_norm(h), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_state_round_trips_exactly_through_safetensors(backbones, family, tmp_path):
    teacher = backbones[family].teacher_weights()
    tensors, metadata = teacher.to_state()
    assert all(isinstance(v, str) for v in metadata.values())
    assert ("final_norm.bias" in tensors) == (teacher.final_norm_bias is not None)
    path = tmp_path / "teacher.safetensors"
    save_file(tensors, path, metadata=metadata)
    with safe_open(str(path), framework="pt") as f:
        loaded = {k: f.get_tensor(k) for k in f.keys()}
        back = TeacherWeights.from_state(loaded, f.metadata())
    for name in ("lm_head", "final_norm", "lm_head_bias", "final_norm_bias"):
        a, b = getattr(teacher, name), getattr(back, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    assert (back.norm_kind, back.norm_eps, back.norm_weight_offset) == (
        teacher.norm_kind, teacher.norm_eps, teacher.norm_weight_offset)
    h = 4 * torch.randn(5, teacher.hidden_size)
    assert torch.equal(back.lens_logits(h), teacher.lens_logits(h))


def test_state_without_a_norm_description_is_refused():
    teacher = TeacherWeights(lm_head=torch.randn(10, 4), final_norm=torch.ones(4))
    tensors, metadata = teacher.to_state()
    with pytest.raises(TeacherStateError, match="older exitflow version; re-run the extract stage"):
        TeacherWeights.from_state(tensors, {})
    with pytest.raises(TeacherStateError, match="older exitflow"):
        TeacherWeights.from_state(tensors, {"format": "pt"})
    with pytest.raises(TeacherStateError, match="format '1'"):
        TeacherWeights.from_state(tensors, {**metadata, "exitflow.teacher_version": "1"})
    with pytest.raises(TeacherStateError, match="lm_head.weight"):
        TeacherWeights.from_state({"final_norm.weight": torch.ones(4)}, metadata)


class _OlmoLikeNorm(nn.Module):
    """LayerNorm with no weight, no bias and no eps attribute (OLMo's final norm)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.normalized_shape = (hidden,)

    def forward(self, x):
        return nn.functional.layer_norm(x.float(), self.normalized_shape, None, None, eps=1e-5).to(x.dtype)


class _LyingEps(nn.RMSNorm):
    """Says eps=1e-6, computes with 1e-3: the eps-sized probe must catch it."""

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-3) * self.weight


def _randomised(norm: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in norm.named_parameters():
            p.copy_((1.0 if name == "weight" else 0.0) + 0.4 * torch.randn(p.shape, generator=g))
    return norm


@pytest.mark.parametrize(
    "norm, kind, bias, eps",
    [
        (nn.LayerNorm(32), "layer", True, 1e-5),
        (nn.LayerNorm(32, eps=1e-6, bias=False), "layer", False, 1e-6),
        (nn.RMSNorm(32, eps=1e-5), "rms", False, 1e-5),
        (_OlmoLikeNorm(32), "layer", False, 1e-5),
        (_LyingEps(32, eps=1e-6), "rms", False, 1e-3),
    ],
)
def test_describe_norm_reads_kind_bias_and_eps(norm, kind, bias, eps):
    norm = _randomised(norm)
    spec = describe_norm(norm, 32)
    assert (spec.kind, spec.bias is not None, spec.weight_offset) == (kind, bias, 0.0)
    assert spec.eps == pytest.approx(eps, rel=1e-3)
    x = 0.05 * torch.randn(7, 32) + 0.02  # eps-sized: a wrong eps shows here
    with torch.no_grad():
        torch.testing.assert_close(spec.apply(x), norm(x).float(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(spec.module()(x), norm(x).float(), atol=1e-5, rtol=1e-5)


def test_made_up_norms_are_refused_with_what_was_tried():
    class MeanAbsNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(16))
            self.eps = 1e-5

        def forward(self, x):
            return x / (x.abs().mean(-1, keepdim=True) + self.eps) * self.weight

    with pytest.raises(NormError, match=r"MeanAbsNorm matches none.*rms_norm\(x\) \* w \(eps 1e-05.*"
                                        r"layer_norm\(x\) \* \(1 \+ w\)"):
        describe_norm(MeanAbsNorm())


def test_backbone_refuses_an_unrebuildable_final_norm(backbones):
    b = backbones["llama"]

    class Tanh(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.weight = inner.weight

        def forward(self, x):
            return torch.tanh(x) * self.weight

    original = b.decoder.norm
    b.decoder.norm = Tanh(original)
    try:
        with pytest.raises(BackboneError, match="LlamaForCausalLM: final norm Tanh matches none"):
            b.teacher_weights()
    finally:
        b.decoder.norm = original


def test_final_norm_module_is_float32_and_survives_fp16_outliers():
    spec = FinalNormSpec("layer", 1 + 0.5 * torch.randn(16), 0.3 * torch.randn(16), 1e-5)
    norm = spec.module()
    assert norm.weight.dtype == torch.float32 and norm.weight.requires_grad and norm.bias.requires_grad
    h = torch.randn(5, 16).half()
    h[:, 0] = 23000.0  # SmolLM2-sized: its square overflows float16
    out = norm(h)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, spec.apply(h.float()))
    assert norm.weight.data_ptr() != spec.weight.data_ptr(), "a module is a fresh copy, not a view"


def test_invalid_norm_descriptions_are_refused_at_once():
    with pytest.raises(NormError, match=r"kind 'batch'.*bias has shape \(3,\).*offset 2"):
        FinalNormSpec("batch", torch.ones(4), torch.zeros(3), 1e-5, 2.0)  # type: ignore[arg-type]
