"""The layered forward against the model's own forward, on every tiny family (fp32)."""

from __future__ import annotations

import pytest
import torch

from pipeline.backbone import load_backbone
from pipeline.config import ModelConfig
from pipeline.layered import LayeredDecoder, LayeredError

FAMILIES = ("llama", "gpt2", "cohere", "gemma")
ATOL = 1e-4


@pytest.fixture(scope="module", params=FAMILIES)
def layered(request, make_tiny_family, tmp_path_factory) -> LayeredDecoder:
    folder = make_tiny_family(tmp_path_factory.mktemp(f"layered-{request.param}"), request.param, num_layers=4)
    return LayeredDecoder(load_backbone(ModelConfig(source=str(folder), device="cpu", dtype="float32")))


def _ids(layered: LayeredDecoder, n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, layered.backbone.vocab_size, (1, n), generator=gen)  # [1, n]


def _reference(layered: LayeredDecoder, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return layered.model(input_ids=ids).logits  # [1, n, V]


@pytest.mark.parametrize("split", [1, 2, 3])
def test_two_ranges_in_one_go_equal_the_model(layered, split):
    ids = _ids(layered, 9)
    cache = layered.new_cache()
    h = layered.forward(ids, cache, end=split)  # [1, 9, H]
    h = layered.run_layers(h, split, layered.num_layers, cache)  # [1, 9, H]
    torch.testing.assert_close(layered.logits(h), _reference(layered, ids), atol=ATOL, rtol=1e-4)
    assert cache.lengths() == [9] * layered.num_layers


def test_token_by_token_with_cache_equals_the_model(layered):
    ids = _ids(layered, 8, seed=1)
    cache = layered.new_cache()
    split = 2
    out = []
    for t in range(ids.shape[1]):
        h = layered.forward(ids[:, t : t + 1], cache, end=split)  # [1, 1, H]
        out.append(layered.logits(layered.run_layers(h, split, layered.num_layers, cache)))
    torch.testing.assert_close(torch.cat(out, dim=1), _reference(layered, ids), atol=ATOL, rtol=1e-4)


def test_draft_ahead_then_crop_and_rerun_equals_the_model(layered):
    """The speculative pattern: lower blocks run ahead token by token, the upper blocks catch
    up in one pass over the lower states, both are cropped to an accepted prefix, and new
    tokens continue from there."""
    ids = _ids(layered, 12, seed=2)
    split, L = 2, layered.num_layers
    cache = layered.new_cache()
    layered.run_layers(layered.forward(ids[:, :5], cache, end=split), split, L, cache)
    lower = torch.cat([layered.forward(ids[:, t : t + 1], cache, end=split) for t in range(5, 9)], dim=1)  # [1, 4, H]
    assert cache.length(0) == 9 and cache.length(L - 1) == 5
    layered.run_layers(lower, split, L, cache)
    cache.crop(6)  # keep the first accepted token only
    assert cache.lengths() == [6] * L
    h = layered.run_layers(layered.forward(ids[:, 6:], cache, end=split), split, L, cache)  # [1, 6, H]
    torch.testing.assert_close(layered.logits(h), _reference(layered, ids)[:, 6:], atol=ATOL, rtol=1e-4)


def test_vocab_subset_logits_are_columns_of_the_full_logits(layered):
    ids = _ids(layered, 4)
    h = layered.forward(ids, layered.new_cache())  # [1, 4, H]
    idx = torch.tensor([5, 0, 17, 3])
    torch.testing.assert_close(layered.logits(h, idx), layered.logits(h)[..., idx])


def test_fill_kv_writes_what_the_block_would_write(layered):
    """State propagation's KV for a copied state equals the KV the block itself writes for it."""
    ids = _ids(layered, 6, seed=3)
    L = layered.num_layers
    full, copied = layered.new_cache(), layered.new_cache()
    h0 = layered.forward(ids[:, :5], full, end=1)  # [1, 5, H]
    layered.forward(ids[:, :5], copied, end=1)
    state = layered.forward(ids[:, 5:], full, end=1)  # [1, 1, H] at position 5
    layered.forward(ids[:, 5:], copied, end=1)
    for j in range(1, L):  # each block fed the same copied state, via its own forward
        layered.run_layers(h0, j, j + 1, full)
        layered.run_layers(state, j, j + 1, full)
        layered.run_layers(h0, j, j + 1, copied)
    layered.fill_kv(state, 1, L, copied)
    for j in range(L):
        torch.testing.assert_close(copied.kv.layers[j].keys, full.kv.layers[j].keys)
        torch.testing.assert_close(copied.kv.layers[j].values, full.kv.layers[j].values)


def test_errors_name_the_value(layered):
    cache = layered.new_cache()
    with pytest.raises(LayeredError, match=r"block range \[2, 99\)"):
        layered.run_layers(torch.zeros(1, 1, layered.backbone.hidden_size), 2, 99, cache)
    layered.forward(_ids(layered, 3), cache, end=1)
    with pytest.raises(LayeredError, match="different cache lengths"):
        layered.run_layers(torch.zeros(1, 1, layered.backbone.hidden_size), 0, 2, cache)
    with pytest.raises(LayeredError, match="exceeds this backbone's context"):
        layered.forward(_ids(layered, layered.max_positions + 1), layered.new_cache())
