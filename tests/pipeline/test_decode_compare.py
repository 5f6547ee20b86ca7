"""The decoding comparison on tiny models of both layouts (fp32); nothing here asserts a timing.

What must hold: prompts are a function of the seed; every speculative setting reproduces greedy;
acceptance and tau are the DecodeResult counts' ratios; perfect heads (blocks past the exit
zeroed, as in test_speculative.py) get every draft accepted; the result is plain JSON.
"""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.backbone import load_backbone
from pipeline.config import HeadsConfig, ModelConfig
from pipeline.decode_compare import (
    DecodeCompareError,
    DecodeSetting,
    Mismatch,
    _first_mismatch,
    calibrate_draft_thresholds,
    compare_decoding,
    default_settings,
    draw_prompts,
    most_frequent_tokens,
)
from pipeline.heads import build_heads
from pipeline.layered import LayeredDecoder
from pipeline.speculative import entropy, speculative_decode

LAYERS = 4
EXIT = 2
NEW = 10


def _load(folder) -> LayeredDecoder:
    return LayeredDecoder(load_backbone(ModelConfig(source=str(folder), device="cpu", dtype="float32")))


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def decoder(request, tiny_model_dir, make_tiny_family, tmp_path_factory) -> LayeredDecoder:
    if request.param == "llama":
        return _load(tiny_model_dir)
    return _load(make_tiny_family(tmp_path_factory.mktemp("cmp-gpt2"), "gpt2", num_layers=LAYERS))


def _heads(dec: LayeredDecoder):
    return build_heads(HeadsConfig(kind="adapter", rank=8), [1, EXIT, 3], dec.backbone.teacher_weights())


def _docs(dec: LayeredDecoder) -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(3, dec.backbone.vocab_size, (n,), generator=gen).tolist() for n in (4, 30, 12, 25, 40)]


def test_prompts_are_seeded_and_of_the_asked_length():
    docs = [list(range(i * 100, i * 100 + n)) for i, n in enumerate((5, 30, 8, 50, 20))]
    a = draw_prompts(docs, 6, 10, seed=1)
    assert a == draw_prompts(docs, 6, 10, seed=1)
    assert a != draw_prompts(docs, 6, 10, seed=2)
    assert len(a) == 6 and all(len(p) == 10 for p in a)  # 3 long documents, visited twice
    for p in a:  # contiguous windows of one document
        assert p == list(range(p[0], p[0] + 10)) and any(p[0] in d and p[-1] in d for d in docs)
    assert draw_prompts(docs, 2, 50, seed=0) == [docs[3], docs[3]]
    with pytest.raises(DecodeCompareError, match=r"length=51 .*longest of 5 has 50.*<= 50"):
        draw_prompts(docs, 2, 51, seed=0)


def test_most_frequent_tokens_orders_by_count_then_id():
    ids = [7, 3, 3, 9, 9, 9, 7, 1]
    assert most_frequent_tokens(ids, 3).tolist() == [9, 3, 7]  # 3 and 7 tie: smaller id first
    assert most_frequent_tokens(torch.tensor(ids).numpy(), 10).tolist() == [9, 3, 7, 1]
    assert most_frequent_tokens(ids, 1).dtype == torch.long
    with pytest.raises(DecodeCompareError, match="n=0"):
        most_frequent_tokens(ids, 0)


def test_default_settings_group_by_layer_with_ablations_at_the_middle_length():
    s = default_settings([2, 3], (1, 3, 5), draft_vocab_size=40)
    assert [x.exit_layer for x in s] == [2] * 6 + [3] * 6
    assert len({x.name for x in s}) == len(s)
    at2 = [(x.draft_len, x.adaptive, x.reuse_kv, x.vocab_size) for x in s[:6]]
    assert at2 == [(1, False, True, None), (3, False, True, None), (3, False, False, None), (3, False, True, 40),
                   (5, False, True, None), (5, True, True, None)]
    assert len(default_settings([2], (2,), adaptive=False)) == 2  # k=2 and its no-KV-reuse ablation


def test_every_setting_equals_greedy_and_its_counts_add_up(decoder):
    heads = _heads(decoder)
    prompts = draw_prompts(_docs(decoder), 3, 9, seed=0)
    with torch.no_grad():
        h = decoder.forward(torch.tensor([prompts[0]]), decoder.new_cache(), end=EXIT)  # [1, n, H]
        median = float(entropy(heads[str(EXIT)].project(heads[str(EXIT)].features(h[0]))).median())
    vocab = most_frequent_tokens([t for d in _docs(decoder) for t in d], 60)
    settings = default_settings([1, EXIT], (1, 3), draft_vocab_size=50)
    cmp = compare_decoding(decoder, heads, prompts, NEW, settings, entropy_thresholds={1: 1e9, EXIT: median},
                           draft_vocab=vocab, early_exit_thresholds={"1": float("-inf"), EXIT: median})

    assert cmp.all_identical and len(cmp.greedy) == 3  # before, after layer 1's group, after layer 2's
    assert [r.setting for r in cmp.settings] == settings
    for r in cmp.settings:
        direct = [speculative_decode(decoder, heads, p, NEW, exit_layer=r.setting.exit_layer,
                                     draft_len=r.setting.draft_len, entropy_threshold=r.entropy_threshold,
                                     reuse_kv=r.setting.reuse_kv,
                                     vocab_idx=vocab[: r.setting.vocab_size] if r.setting.vocab_size else None)
                  for p in prompts]
        assert (r.drafted, r.accepted, r.verifications) == (sum(d.drafted for d in direct),
                                                            sum(d.accepted for d in direct),
                                                            sum(d.steps for d in direct))
        assert r.identical and r.first_mismatch is None and r.tokens == 3 * NEW
        assert r.accepted + r.verifications == r.tokens  # each verification: its accepted drafts + 1
        assert r.tau == r.accepted / r.verifications
        assert r.acceptance == (r.accepted / r.drafted if r.drafted else None)
        assert sum(vars(r.time_split).values()) == pytest.approx(1.0)
        assert r.entropy_threshold == ({1: 1e9, EXIT: median}[r.setting.exit_layer] if r.setting.adaptive else None)
    assert cmp.best is not None and cmp.best.identical
    assert cmp.best.speedup == max(r.speedup for r in cmp.settings if r.drafted)
    e = cmp.early_exit
    assert e.tokens == 3 * NEW and 0.0 <= e.layers_skipped < 1.0 and 0.0 <= e.matches_greedy <= 1.0
    assert cmp.draft_vocab_size == 60 and 0.0 <= cmp.draft_vocab_covers_greedy <= 1.0

    d = json.loads(json.dumps(cmp.to_dict(), allow_nan=False))
    assert d["best"] == cmp.best.setting.name and d["all_identical"] is True
    assert d["early_exit"]["thresholds"]["1"] == "-inf"
    assert [row["name"] for row in d["settings"]] == [s.name for s in settings]
    assert set(d["settings"][0]) >= {"exit_layer", "draft_len", "tau", "acceptance", "speedup", "time_split",
                                     "identical", "first_mismatch"}


def test_perfect_heads_have_acceptance_one(tiny_model_dir):
    dec = _load(tiny_model_dir)
    with torch.no_grad():  # blocks past the exit add nothing: the lens at EXIT is the model's output
        for block in dec.blocks[EXIT:]:
            for p in block.parameters():
                p.zero_()
    heads = _heads(dec)
    prompts = draw_prompts(_docs(dec), 2, 7, seed=4)
    settings = [DecodeSetting(f"k={k}", EXIT, k) for k in (1, 4)]
    cmp = compare_decoding(dec, heads, prompts, NEW, settings, retime_greedy_every_group=False)
    assert len(cmp.greedy) == 1 and cmp.early_exit is None and cmp.draft_vocab_size is None
    for r in cmp.settings:
        k = r.setting.draft_len
        assert r.identical and r.acceptance == 1.0
        assert r.verifications == 2 * -(-NEW // (k + 1)) and r.tau == r.accepted / r.verifications
    assert cmp.best.setting.draft_len in (1, 4)


def test_calibrated_thresholds_per_layer(tiny_model_dir):
    dec = _load(tiny_model_dir)
    heads = _heads(dec)
    ids = _docs(dec)[4]
    loose = calibrate_draft_thresholds(dec, heads, [1, EXIT], ids, level=0.01)
    strict = calibrate_draft_thresholds(dec, heads, [1, EXIT], ids, level=0.99)
    assert set(loose) == set(strict) == {1, EXIT}
    assert all(strict[layer] <= loose[layer] for layer in loose)
    with torch.no_grad():  # perfect heads: every token agrees, so any level admits them all
        for block in dec.blocks[EXIT:]:
            for p in block.parameters():
                p.zero_()
        h = dec.forward(torch.tensor([ids]), dec.new_cache(), end=EXIT)  # [1, n, H]
        top = float(entropy(heads[str(EXIT)].project(heads[str(EXIT)].features(h[0]))).max())
    assert calibrate_draft_thresholds(dec, heads, [EXIT], ids, level=0.99)[EXIT] == pytest.approx(top, rel=1e-5)
    with pytest.raises(DecodeCompareError, match=r"no head at layers \[3\]"):
        calibrate_draft_thresholds(dec, {"1": heads["1"]}, [1, 3], ids, level=0.5)


def test_first_mismatch_position():
    assert _first_mismatch([[1, 2], [3, 4, 5]], [[1, 2], [3, 4, 5]]) is None
    assert _first_mismatch([[1, 2], [3, 9, 5]], [[1, 2], [3, 4, 5]]) == Mismatch(1, 1)
    assert _first_mismatch([[1, 2]], [[1, 2, 3]]) == Mismatch(0, 2)


def test_every_problem_is_reported_at_once(tiny_model_dir):
    dec = _load(tiny_model_dir)
    heads = _heads(dec)
    settings = [DecodeSetting("a", EXIT, 0), DecodeSetting("b", EXIT, 3, adaptive=True),
                DecodeSetting("c", 4, 2), DecodeSetting("d", EXIT, 2, vocab_size=10)]
    with pytest.raises(DecodeCompareError) as err:
        compare_decoding(dec, heads, [[5] * 4], NEW, settings, early_exit_thresholds={5: 1.0})
    msg = str(err.value)
    for part in ("a: draft_len=0", "b: adaptive but entropy_thresholds has None for layer 2",
                 "c: exit layer 4 is outside 1..3", "d: vocab_size=10 but draft_vocab holds 0 ids",
                 "early exit: exit layer 5 is outside"):
        assert part in msg, part
