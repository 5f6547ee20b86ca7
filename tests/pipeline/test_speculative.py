"""Self-speculative and early-exit decoding on tiny models of both layouts (fp32).

The property that matters: speculative output equals greedy output token for token, for any
head (logit lens, a random one, a perfect one), draft length, adaptive stop, draft vocabulary
and prompt length. "Perfect" heads come from a backbone whose blocks past the exit layer are
zeroed (each becomes the identity on the residual stream), so the logit lens at the exit layer
equals the model's own output and every draft must be accepted.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.backbone import load_backbone
from pipeline.config import HeadsConfig, ModelConfig
from pipeline.heads import build_heads
from pipeline.layered import LayeredDecoder
from pipeline.speculative import (
    DecodeError,
    early_exit_decode,
    entropy,
    greedy_decode,
    speculative_decode,
)

LAYERS = 4
EXIT = 2
NEW = 14


def _load(folder) -> LayeredDecoder:
    return LayeredDecoder(load_backbone(ModelConfig(source=str(folder), device="cpu", dtype="float32")))


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def family_dir(request, make_tiny_family, tmp_path_factory):
    return make_tiny_family(tmp_path_factory.mktemp(f"spec-{request.param}"), request.param, num_layers=LAYERS)


@pytest.fixture(scope="module")
def decoder(family_dir) -> LayeredDecoder:
    return _load(family_dir)


@pytest.fixture(scope="module")
def identity_top(family_dir) -> LayeredDecoder:
    """The same model with blocks [EXIT, L) zeroed: each adds nothing to the residual stream."""
    dec = _load(family_dir)
    with torch.no_grad():
        for block in dec.blocks[EXIT:]:
            for p in block.parameters():
                p.zero_()
    return dec


def _heads(dec: LayeredDecoder, random: bool = False):
    heads = build_heads(HeadsConfig(kind="adapter", rank=8), [1, EXIT, 3], dec.backbone.teacher_weights())
    if random:
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in heads.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return heads


def _prompts(dec: LayeredDecoder) -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(3, dec.backbone.vocab_size, (n,), generator=gen).tolist() for n in (1, 5, 17)]


@torch.no_grad()
def _entropy_quantile(dec: LayeredDecoder, heads, seq: list[int], q: float = 0.5, layer: int = EXIT) -> float:
    """A threshold that stops some drafts (or exits some tokens) and not others."""
    h = dec.forward(torch.tensor([seq]), dec.new_cache(), end=layer)  # [1, n, H]
    head = heads[str(layer)]
    return float(entropy(head.project(head.features(h[0]))).quantile(q))


def test_greedy_equals_hf_generate(decoder):
    for prompt in _prompts(decoder):
        ours = greedy_decode(decoder, prompt, NEW).ids
        gen = decoder.model.generate(torch.tensor([prompt]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                     pad_token_id=0)
        assert ours == gen[0, len(prompt):].tolist()


@pytest.mark.parametrize("random_heads", [False, True], ids=["lens", "random"])
def test_speculative_equals_greedy(decoder, random_heads):
    heads = _heads(decoder, random=random_heads)
    vocab = torch.randperm(decoder.backbone.vocab_size, generator=torch.Generator().manual_seed(1))[:100]
    for prompt in _prompts(decoder):
        greedy = greedy_decode(decoder, prompt, NEW).ids
        threshold = _entropy_quantile(decoder, heads, prompt + greedy)
        cases = [(EXIT, k, thr, v) for k in (1, 3, 8) for thr in (None, threshold) for v in (None, vocab)]
        cases += [(layer, 3, thr, v) for layer in (1, 3) for thr in (None, threshold) for v in (None, vocab)]
        for layer, k, thr, vocab_idx in cases:
            r = speculative_decode(decoder, heads, prompt, NEW, exit_layer=layer, draft_len=k,
                                   entropy_threshold=thr, vocab_idx=vocab_idx)
            assert r.ids == greedy, (layer, k, thr, vocab_idx is not None, len(prompt))
            assert r.accepted + r.steps == NEW  # each verification adds its accepted drafts + 1
            assert 0 <= r.accepted <= r.drafted <= k * r.steps


def test_no_kv_reuse_gives_the_same_output(decoder):
    heads = _heads(decoder)
    for prompt in _prompts(decoder):
        greedy = greedy_decode(decoder, prompt, NEW).ids
        for k in (2, 5):
            r = speculative_decode(decoder, heads, prompt, NEW, exit_layer=EXIT, draft_len=k, reuse_kv=False)
            assert r.ids == greedy


def test_perfect_heads_accept_every_draft(identity_top):
    heads = _heads(identity_top)
    for prompt in _prompts(identity_top):
        greedy = greedy_decode(identity_top, prompt, NEW).ids
        for k in (1, 3, 8):
            for vocab_idx in (None, torch.tensor(sorted(set(greedy)))):  # a draft vocabulary holding every answer
                r = speculative_decode(identity_top, heads, prompt, NEW, exit_layer=EXIT, draft_len=k,
                                       vocab_idx=vocab_idx)
                assert r.ids == greedy
                assert r.acceptance_rate == 1.0
                # drafts are capped so that the bonus token never overshoots NEW
                assert r.steps == -(-NEW // (k + 1)) and r.tau == r.accepted / r.steps


def test_adaptive_draft_stops_on_entropy(decoder):
    heads = _heads(decoder)
    prompt = _prompts(decoder)[1]
    never = speculative_decode(decoder, heads, prompt, NEW, exit_layer=EXIT, draft_len=4, entropy_threshold=-1.0)
    assert never.drafted == 0 and never.steps == NEW  # entropy is never below 0: plain greedy
    always = speculative_decode(decoder, heads, prompt, NEW, exit_layer=EXIT, draft_len=4, entropy_threshold=1e9)
    fixed = speculative_decode(decoder, heads, prompt, NEW, exit_layer=EXIT, draft_len=4)
    assert (always.drafted, always.accepted) == (fixed.drafted, fixed.accepted)
    assert never.ids == always.ids == fixed.ids


def test_eos_stops_generation(decoder):
    heads = _heads(decoder)
    prompt = _prompts(decoder)[1]
    greedy = greedy_decode(decoder, prompt, NEW).ids
    eos = greedy[5]
    want = greedy[: greedy.index(eos) + 1]
    assert greedy_decode(decoder, prompt, NEW, eos_token_id=eos).ids == want
    assert speculative_decode(decoder, heads, prompt, NEW, EXIT, 4, eos_token_id=eos).ids == want


def test_early_exit_never_exiting_is_greedy(decoder):
    heads = _heads(decoder)
    for prompt in _prompts(decoder):
        r = early_exit_decode(decoder, heads, prompt, NEW, thresholds={1: -1.0, EXIT: -1.0})
        assert r.ids == greedy_decode(decoder, prompt, NEW).ids
        assert r.matches_greedy == 1.0 and r.layers_skipped == 0.0 and set(r.exit_layers) == {LAYERS}


def test_early_exit_always_exiting_is_the_truncated_model(decoder):
    """Exiting every token at layer l: the lower blocks' KV is exact, so the output equals greedy
    decoding of "blocks [0, l) + head" recomputed from scratch each step (no cache at all)."""
    heads = _heads(decoder, random=True)
    head = heads[str(EXIT)]
    for prompt in _prompts(decoder):
        r = early_exit_decode(decoder, heads, prompt, NEW, thresholds={EXIT: float("inf")}, reference=[])
        seq = list(prompt)
        for _ in range(NEW):
            h = decoder.forward(torch.tensor([seq]), decoder.new_cache(), end=EXIT)  # [1, n, H]
            seq.append(int(head.project(head.features(h[0, -1:])).argmax()))
        assert r.ids == seq[len(prompt):]
        assert r.exit_layers == [EXIT] * NEW and r.layers_skipped == (LAYERS - EXIT) / LAYERS


def test_early_exit_with_perfect_heads_matches_greedy(identity_top):
    heads = _heads(identity_top)
    prompt = _prompts(identity_top)[2]
    r = early_exit_decode(identity_top, heads, prompt, NEW, thresholds={EXIT: float("inf")})
    assert r.matches_greedy == 1.0 and r.layers_skipped == 0.5


def test_mixed_exits_keep_the_caches_consistent(decoder):
    """Some tokens exit at 1, some at 2, some run to the end: every block range still finds
    equal cache lengths (run_layers would raise otherwise)."""
    heads = _heads(decoder)
    prompt = _prompts(decoder)[2]
    seq = prompt + greedy_decode(decoder, prompt, 24).ids
    thresholds = {layer: _entropy_quantile(decoder, heads, seq, 0.2, layer) for layer in (1, EXIT)}
    r = early_exit_decode(decoder, heads, prompt, 24, thresholds=thresholds)
    assert len(r.ids) == 24 and 0.0 < r.layers_skipped < 1.0 and len(set(r.exit_layers)) > 1


def test_errors_name_the_value_and_the_fix(decoder):
    heads = _heads(decoder)
    with pytest.raises(DecodeError, match="draft_len=0"):
        speculative_decode(decoder, heads, [5], NEW, exit_layer=EXIT, draft_len=0)
    only_one = {"1": heads["1"]}
    with pytest.raises(DecodeError, match=r"exit layer 2 has no head .*layers \[1\]"):
        speculative_decode(decoder, only_one, [5], NEW, exit_layer=2, draft_len=2)
    with pytest.raises(DecodeError, match="exit layer 4 is outside 1..3"):
        early_exit_decode(decoder, heads, [5], NEW, thresholds={4: 1.0})
    ctx = decoder.max_positions
    with pytest.raises(DecodeError, match=f"prompt has {ctx + 1} tokens, longer than the model's context of {ctx}"):
        greedy_decode(decoder, [5] * (ctx + 1), NEW)
    with pytest.raises(DecodeError, match="lower max_new_tokens"):
        speculative_decode(decoder, heads, [5] * (ctx - 2), NEW, exit_layer=EXIT, draft_len=2)
    with pytest.raises(DecodeError, match="prompt is empty"):
        greedy_decode(decoder, [], NEW)


@pytest.mark.slow
def test_speculative_equals_greedy_on_the_embedded_model():
    from pipeline.data import load_corpus
    from pipeline.config import DataConfig

    dec = LayeredDecoder(load_backbone(ModelConfig(device="cpu", dtype="float32")))
    heads = build_heads(HeadsConfig(), [6, 12], dec.backbone.teacher_weights())
    for text in load_corpus(DataConfig()).documents[:3]:
        prompt = dec.backbone.tokenizer(text[:300])["input_ids"]
        greedy = greedy_decode(dec, prompt, 16).ids
        for layer, k, thr in ((6, 4, None), (12, 3, 3.0)):
            assert speculative_decode(dec, heads, prompt, 16, exit_layer=layer, draft_len=k,
                                      entropy_threshold=thr).ids == greedy
