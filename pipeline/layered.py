"""Run any contiguous range of a backbone's blocks over new tokens, with a KV cache per layer.

Self-speculative and early-exit decoding need the model cut in pieces that HF's `forward`
does not offer: the first l blocks for drafting, blocks l..L over the draft's layer-l states
for verification (KV reuse, as LayerSkip does), and the final norm + LM head on whatever
comes out. `LayeredDecoder` is that one API for all three; it drives HF's own decoder-layer
modules and HF's `DynamicCache`, calling each layer the way the model's own forward does
(rotary `position_embeddings` for Llama-style models, learned `wpe` positions for GPT-2, an
explicit attention mask for the new tokens), so every family whose layers follow either
convention works without per-family copies of attention code.

Why the cache is kept per layer rather than per model: during a draft the first l blocks are
ahead of the rest by the drafted tokens, so layers hold different lengths and are cropped
independently (`KVCache.crop`). A layer range therefore derives its new tokens' positions from
its own layers' cache length, and refuses a range whose layers disagree.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import nn

from pipeline.backbone import Backbone

if TYPE_CHECKING:  # transformers takes seconds to import; decoding loads a backbone (and it) anyway
    from transformers import DynamicCache
from pipeline.teacher import project_vocab

log = logging.getLogger(__name__)

_SUPPORTED_ATTENTION = ("eager", "sdpa")


class LayeredError(ValueError):
    """A layer range, cache or input cannot be run as asked; the message says what to change."""


class KVCache:
    """The keys and values of one sequence, per decoder block (0-based), in a `DynamicCache`.

    Blocks may hold different lengths: a draft runs ahead in the first blocks. `crop` rolls a
    range of blocks back to an accepted prefix; rejected draft tokens must leave every block
    they reached, not only the verifier's.
    """

    def __init__(self, num_layers: int):
        self.num_layers = int(num_layers)
        # No config: every layer a full (non-sliding) DynamicLayer, croppable to any length.
        from transformers import DynamicCache

        self.kv = DynamicCache()

    def length(self, layer: int) -> int:
        """Tokens cached at block `layer` (0-based)."""
        return self.kv.get_seq_length(layer) if layer < len(self.kv.layers) else 0

    def lengths(self) -> list[int]:
        return [self.length(j) for j in range(self.num_layers)]

    def crop(self, length: int, start: int = 0, end: int | None = None) -> None:
        """Keep the first `length` tokens of blocks [start, end) (default all); shorter blocks are left."""
        end = self.num_layers if end is None else end
        for j in range(start, min(end, len(self.kv.layers))):
            extra = self.length(j) - int(length)
            if extra > 0:
                self.kv.layers[j].crop(-extra)


class _KVWritten(Exception):
    """Raised by `_KVOnly` once a layer has written its keys and values: the rest of the layer
    (attention, output projection, MLP) is exactly what a state-propagated exit skips."""


class _KVOnly:
    """A stand-in cache that stores the new keys/values in the real cache, then stops the layer.

    Every HF attention module calls `past_key_values.update(k, v, layer_idx)` right after its
    key/value projections (rotary, qk-norms included) and before attention: catching that
    call is the one family-independent way to compute a layer's KV without its attention and
    MLP, with HF's own projection code.
    """

    def __init__(self, cache: DynamicCache):
        self.cache = cache

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.cache.update(key_states, value_states, layer_idx)
        raise _KVWritten


class LayeredDecoder:
    """A frozen backbone as separately callable pieces: embeddings, block ranges, final logits.

    All methods take batch-first tensors (`[b, n]` ids, `[b, n, H]` states) for sequences of
    equal length; decoding uses b = 1. Block indices are 0-based: blocks [0, l) produce the
    state that exit layer l (1-based, as heads and the cache count layers) sees.
    """

    def __init__(self, backbone: Backbone):
        self.backbone = backbone
        self.model = backbone.model
        self.decoder = backbone.decoder
        self.blocks = backbone.decoder_layers()
        self.final_norm = backbone.final_norm
        self.lm_head = backbone.lm_head
        self.num_layers = backbone.num_layers
        self.device = backbone.device
        config = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else self.model.config
        self.config = config
        impl = getattr(config, "_attn_implementation", None) or "eager"
        if impl not in _SUPPORTED_ATTENTION:
            raise LayeredError(f"attention implementation {impl!r} is not supported by the layered forward "
                               f"(it builds 4D additive masks); load the model with attn_implementation in {_SUPPORTED_ATTENTION}")
        self.embed_tokens = self.decoder.get_input_embeddings()
        self.wpe: nn.Module | None = getattr(self.decoder, "wpe", None)  # GPT-2: learned absolute positions
        self.rotary: nn.Module | None = getattr(self.decoder, "rotary_emb", None)  # Llama-style: rotary
        if (self.wpe is None) == (self.rotary is None):
            raise LayeredError(
                f"{type(self.model).__name__}: the layered forward knows rotary models (decoder.rotary_emb) and "
                "learned absolute positions (decoder.wpe); this one has "
                f"{'both' if self.wpe is not None else 'neither'}. Decode it with model.generate instead."
            )
        self.max_positions = self._max_positions(config)
        # Output scaling some families apply after the LM head (Cohere: logit_scale; Gemma 2: soft-capping).
        self.logit_scale = float(getattr(self.model, "logit_scale", 1.0) or 1.0)
        self.softcap: float | None = getattr(config, "final_logit_softcapping", None)

    def _max_positions(self, config) -> int:
        """The backbone's context, or its sliding window if it has one: past the window the model
        masks differently from the plain causal mask built here."""
        limit = self.backbone.max_context
        window = getattr(config, "sliding_window", None)
        types = getattr(config, "layer_types", None)
        slides = ("sliding_attention" in types) if types else bool(getattr(config, "use_sliding_window", window))
        if isinstance(window, int) and window > 0 and slides:
            limit = min(limit, window)
        return int(limit)

    def new_cache(self) -> KVCache:
        return KVCache(self.num_layers)

    def check_fits(self, tokens: int, what: str = "sequence") -> None:
        """Refuse positions the model was not trained for, before any compute."""
        if tokens > self.max_positions:
            raise LayeredError(f"{what} of {tokens} tokens exceeds this backbone's context of {self.max_positions} "
                               f"positions; shorten the prompt or lower max_new_tokens so the total is <= {self.max_positions}")

    def _positions(self, start: int, n: int) -> torch.Tensor:
        return torch.arange(start, start + n, device=self.device).unsqueeze(0)  # [1, n]

    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor, start: int) -> torch.Tensor:
        """input_ids [b, n] at positions start..start+n-1 -> block-0 input [b, n, H] (token
        embeddings, scaled where the family's embedding module scales, plus `wpe` for GPT-2)."""
        input_ids = input_ids.to(self.device)  # [b, n]
        self.check_fits(start + input_ids.shape[1])
        h = self.embed_tokens(input_ids)  # [b, n, H]
        if self.wpe is not None:
            h = h + self.wpe(self._positions(start, input_ids.shape[1])).to(h.dtype)  # [b, n, H]
        return h

    def _mask(self, n: int, past: int, dtype: torch.dtype) -> torch.Tensor | None:
        """Additive mask [1, 1, n, past + n]: new tokens see the whole cached prefix and are
        causal among themselves. None for one token (it sees everything), as HF does."""
        if n == 1:
            return None
        q = torch.arange(n, device=self.device).unsqueeze(1)  # [n, 1]
        k = torch.arange(past + n, device=self.device).unsqueeze(0) - past  # [1, past + n]
        blocked = k > q  # [n, past + n]
        mask = torch.zeros(n, past + n, dtype=dtype, device=self.device)
        return mask.masked_fill_(blocked, torch.finfo(dtype).min)[None, None]  # [1, 1, n, past + n]

    def _check_range(self, start: int, end: int, cache: KVCache) -> int:
        if not 0 <= start < end <= self.num_layers:
            raise LayeredError(f"block range [{start}, {end}) is not inside [0, {self.num_layers}); "
                               "pass 0 <= start < end <= num_layers")
        past = cache.length(start)
        uneven = {j: cache.length(j) for j in range(start, end) if cache.length(j) != past}
        if uneven:
            raise LayeredError(f"blocks [{start}, {end}) hold different cache lengths (block {start}: {past}, "
                               f"others: {uneven}); crop the cache to a common length before running this range")
        return past

    @torch.no_grad()
    def run_layers(self, hidden: torch.Tensor, start: int, end: int, cache: KVCache) -> torch.Tensor:
        """Blocks [start, end) over new tokens: hidden [b, n, H] (the block-`start` input of the
        n tokens after the cached prefix) -> the block-`end` input [b, n, H]. Appends the new
        tokens' keys and values to each block's cache."""
        past = self._check_range(start, end, cache)
        n = hidden.shape[1]
        self.check_fits(past + n)
        positions = self._positions(past, n)  # [1, n]
        kwargs: dict = {"attention_mask": self._mask(n, past, hidden.dtype), "position_ids": positions,
                        "past_key_values": cache.kv, "use_cache": True}
        if self.rotary is not None:
            kwargs["position_embeddings"] = self.rotary(hidden, position_ids=positions)  # cos, sin: [1, n, d]
        for block in self.blocks[start:end]:
            hidden = block(hidden, **kwargs)  # [b, n, H]
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden  # older layers return tuples
        return hidden

    @torch.no_grad()
    def fill_kv(self, state: torch.Tensor, start: int, end: int, cache: KVCache) -> None:
        """Write keys/values for blocks [start, end) computed from one state copied up to every
        one of them (CALM's state propagation): state [b, n, H] stands in for each block's
        input. Only each block's input norm and K/V projections run (`_KVOnly`); attention and
        MLP are skipped, which is where an early exit saves its compute."""
        past = self._check_range(start, end, cache)
        n = state.shape[1]
        positions = self._positions(past, n)  # [1, n]
        kwargs: dict = {"attention_mask": None, "position_ids": positions, "past_key_values": _KVOnly(cache.kv),
                        "use_cache": True}
        if self.rotary is not None:
            kwargs["position_embeddings"] = self.rotary(state, position_ids=positions)  # cos, sin: [1, n, d]
        for j, block in enumerate(self.blocks[start:end], start=start):
            try:
                block(state, **kwargs)
            except _KVWritten:
                continue
            raise LayeredError(f"block {j} ({type(block).__name__}) finished without writing its keys/values to "
                               "the cache; state propagation does not support this architecture")

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor, vocab_idx: torch.Tensor | None = None) -> torch.Tensor:
        """The model's own output: final norm, LM head (and any family-specific scaling) on the
        last block's output. hidden [..., H] -> [..., V], or [..., k] for vocab_idx [k]."""
        feats = self.final_norm(hidden)  # [..., H]
        bias = getattr(self.lm_head, "bias", None)
        out = project_vocab(feats, self.lm_head.weight, bias, vocab_idx)  # [..., V] or [..., k]
        if self.logit_scale != 1.0:
            out = out * self.logit_scale
        if self.softcap:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, cache: KVCache, end: int | None = None) -> torch.Tensor:
        """Embeddings and blocks [0, end) (default all) for new tokens input_ids [b, n] after
        the cached prefix -> the block-`end` input [b, n, H]."""
        end = self.num_layers if end is None else end
        hidden = self.embed(input_ids, cache.length(0))  # [b, n, H]
        return self.run_layers(hidden, 0, end, cache)
