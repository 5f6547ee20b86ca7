"""Decoding that uses the exit heads: a greedy baseline, self-speculative greedy, early exit.

All three run on `pipeline.layered.LayeredDecoder` (HF's own blocks and cache), so the
baseline and the methods measured against it share one code path and one cost model.

Self-speculative greedy decoding (as in LayerSkip / Draft & Verify): the first l blocks
plus the head at l draft up to k tokens; one pass of blocks l..L over the draft's layer-l
states checks them all. The lower blocks *are* the full model's, so those states and their
KV are exactly what the full model computes: the verifier starts at block l (KV reuse) and
the lower blocks' KV of accepted tokens is kept. The longest draft prefix equal to the full
model's greedy choice is accepted, plus the model's own next token (the bonus); every block
is cropped back to the accepted prefix. Output equals greedy decoding token for token, up to
float rounding between a one-token and a multi-token pass (fp32: no difference seen in tests).

Invariant of every loop here: all tokens but the last have KV in every block; the last one
(the previous step's bonus or greedy token) has none, and the next step starts by running it.

Entropies are in nats, over the head's softmax (over the reduced vocabulary when one is
given): a draft stops before a token whose entropy exceeds the threshold, so its length adapts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.layered import LayeredDecoder

log = logging.getLogger(__name__)

HeadMap = Mapping[int, nn.Module] | Mapping[str, nn.Module]
"""Exit heads by 1-based exit layer; a `build_heads`/`load_heads` ModuleDict (keys "6", "12") fits."""


class DecodeError(ValueError):
    """A decoding request cannot be run as asked; the message names the value and the fix."""


@dataclass
class _Timer:
    """Seconds per part of a decode loop, synchronising CUDA so the split is honest."""

    device: torch.device
    seconds: dict[str, float] = field(default_factory=dict)

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def add(self, name: str, since: float) -> float:
        t = self.now()
        self.seconds[name] = self.seconds.get(name, 0.0) + t - since
        return t


@dataclass(frozen=True)
class DecodeResult:
    """One greedy or self-speculative generation and where its time went.

    `steps` counts full-depth passes after the prefill (verifications; for greedy, one per
    token). `total_s` includes the prefill, as a user waiting for the text sees it.
    """

    prompt_len: int
    ids: list[int]
    """Generated token ids, without the prompt."""
    steps: int
    drafted: int
    """Draft tokens proposed by the head (0 for greedy)."""
    accepted: int
    """Draft tokens the verifier agreed with (bonus tokens not counted)."""
    prefill_s: float
    draft_s: float
    """Blocks [0, l) and the head, for the last accepted token and the drafts."""
    verify_s: float
    """Blocks [l, L) (or [0, L) without KV reuse) and the final logits; for greedy, every step."""
    overhead_s: float
    """Everything else: acceptance, cache cropping, bookkeeping."""
    total_s: float

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / drafted; None when nothing was drafted."""
        return self.accepted / self.drafted if self.drafted else None

    @property
    def tau(self) -> float | None:
        """Mean accepted length: accepted draft tokens per verification pass. Each pass also yields
        one token of the model's own, so tokens per full-depth pass is tau + 1."""
        return self.accepted / self.steps if self.steps else None

    @property
    def tokens_per_s(self) -> float:
        return len(self.ids) / self.total_s if self.total_s > 0 else float("inf")


@dataclass(frozen=True)
class EarlyExitResult:
    """One early-exit generation (no verification): tokens, where each one exited, and what it saved."""

    prompt_len: int
    ids: list[int]
    exit_layers: list[int]
    """1-based layer each generated token came from; num_layers for the model's own output."""
    num_layers: int
    matches_greedy: float
    """Share of generated positions whose token equals full greedy decoding's at that position."""
    total_s: float

    @property
    def layers_skipped(self) -> float:
        """Share of the generated tokens' block passes that were skipped (their input norm and K/V
        projections still run, to fill the cache by state propagation)."""
        if not self.exit_layers:
            return 0.0
        return sum(self.num_layers - e for e in self.exit_layers) / (self.num_layers * len(self.exit_layers))

    @property
    def tokens_per_s(self) -> float:
        return len(self.ids) / self.total_s if self.total_s > 0 else float("inf")


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """logits [n, V] -> entropy in nats [n], computed in float32."""
    logp = F.log_softmax(logits.float(), dim=-1)  # [n, V]
    return -(logp.exp() * logp).sum(dim=-1)  # [n]


def _prompt_ids(decoder: LayeredDecoder, prompt: Sequence[int] | torch.Tensor, max_new_tokens: int) -> list[int]:
    """The prompt as a list of ids, checked against the context before any compute."""
    ids = prompt.reshape(-1).tolist() if isinstance(prompt, torch.Tensor) else [int(t) for t in prompt]
    if not ids:
        raise DecodeError("the prompt is empty; pass at least one token id (e.g. the BOS token)")
    if max_new_tokens < 1:
        raise DecodeError(f"max_new_tokens={max_new_tokens} must be >= 1")
    ctx = decoder.max_positions
    if len(ids) > ctx:
        raise DecodeError(f"the prompt has {len(ids)} tokens, longer than the model's context of {ctx}; "
                          f"keep its last {ctx - max_new_tokens} tokens or fewer")
    if len(ids) + max_new_tokens > ctx:
        raise DecodeError(f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context "
                          f"of {ctx}; lower max_new_tokens to <= {ctx - len(ids)} or shorten the prompt")
    return ids


def _heads_by_layer(decoder: LayeredDecoder, heads: HeadMap, layers: Sequence[int]) -> dict[int, nn.Module]:
    by_layer = {int(k): v for k, v in heads.items()}
    for layer in layers:
        if not 1 <= layer <= decoder.num_layers - 1:
            raise DecodeError(f"exit layer {layer} is outside 1..{decoder.num_layers - 1} for this "
                              f"{decoder.num_layers}-layer backbone; pick one of the head layers {sorted(by_layer)}")
        if layer not in by_layer:
            raise DecodeError(f"exit layer {layer} has no head (heads exist for layers {sorted(by_layer)}); "
                              f"pick one of those or train a head at layer {layer}")
    return by_layer


def _as_ids(decoder: LayeredDecoder, ids: Sequence[int]) -> torch.Tensor:
    return torch.tensor([list(ids)], dtype=torch.long, device=decoder.device)  # [1, n]


def _head_logits(head: nn.Module, h: torch.Tensor, vocab_idx: torch.Tensor | None = None) -> torch.Tensor:
    """A head on block outputs h [1, n, H] -> logits [n, V] (or [n, k] on vocab_idx [k])."""
    return head.project(head.features(h[0].float()), vocab_idx)  # [n, V] or [n, k]


def _prefill(decoder: LayeredDecoder, ids: list[int], caches: Sequence[tuple[object, int]]) -> None:
    """Run all prompt tokens but the last through blocks [0, end) of each (cache, end)."""
    if len(ids) > 1:
        for cache, end in caches:
            decoder.forward(_as_ids(decoder, ids[:-1]), cache, end=end)  # type: ignore[arg-type]


def _until_eos(tokens: list[int], eos_token_id: int | None) -> tuple[list[int], bool]:
    if eos_token_id is not None and eos_token_id in tokens:
        return tokens[: tokens.index(eos_token_id) + 1], True
    return tokens, False


@torch.no_grad()
def greedy_decode(decoder: LayeredDecoder, prompt: Sequence[int] | torch.Tensor, max_new_tokens: int,
                  eos_token_id: int | None = None) -> DecodeResult:
    """Plain greedy decoding with the KV cache: one full-depth pass per token. The baseline the
    speculative and early-exit loops are timed against, on the same layered code path."""
    ids = _prompt_ids(decoder, prompt, max_new_tokens)
    timer = _Timer(decoder.device)
    t0 = t = timer.now()
    cache = decoder.new_cache()
    _prefill(decoder, ids, [(cache, decoder.num_layers)])
    t = timer.add("prefill", t)
    out: list[int] = []
    x = ids[-1]
    while len(out) < max_new_tokens:
        h = decoder.forward(_as_ids(decoder, [x]), cache)  # [1, 1, H]
        x = int(decoder.logits(h[0]).argmax(dim=-1))
        t = timer.add("verify", t)
        out.append(x)
        if eos_token_id is not None and x == eos_token_id:
            break
    s = timer.seconds
    return DecodeResult(len(ids), out, steps=len(out), drafted=0, accepted=0, prefill_s=s.get("prefill", 0.0),
                        draft_s=0.0, verify_s=s.get("verify", 0.0), overhead_s=0.0, total_s=t - t0)


@torch.no_grad()
def speculative_decode(decoder: LayeredDecoder, heads: HeadMap, prompt: Sequence[int] | torch.Tensor,
                       max_new_tokens: int, exit_layer: int, draft_len: int,
                       entropy_threshold: float | None = None, vocab_idx: torch.Tensor | None = None,
                       reuse_kv: bool = True, eos_token_id: int | None = None) -> DecodeResult:
    """Self-speculative greedy decoding; the output equals `greedy_decode`'s.

    Each step drafts up to `draft_len` tokens with blocks [0, exit_layer) and the head at
    `exit_layer`, stopping before a token whose head entropy exceeds `entropy_threshold`
    (None: always the full draft), then verifies them in one pass. `vocab_idx` [k] (token
    ids) makes the head score only those candidates: a draft token outside them is simply
    rejected, so the output stays exact while the head costs k/V of a full projection.
    `reuse_kv=False` is the naive baseline: the verifier recomputes blocks [0, exit_layer)
    for the drafted tokens in a cache of its own, as a separate draft model would.
    """
    if draft_len < 1:
        raise DecodeError(f"draft_len={draft_len} must be >= 1; use greedy_decode to decode without drafts")
    ids = _prompt_ids(decoder, prompt, max_new_tokens)
    head = _heads_by_layer(decoder, heads, [exit_layer])[exit_layer]
    if vocab_idx is not None:
        vocab_idx = vocab_idx.to(device=decoder.device, dtype=torch.long).reshape(-1)  # [k]
        if vocab_idx.numel() == 0:
            raise DecodeError("vocab_idx is empty; pass the draft vocabulary's token ids, or None for all")
    L, lo = decoder.num_layers, exit_layer
    timer = _Timer(decoder.device)
    t0 = t = timer.now()
    cache = decoder.new_cache()  # every block; with reuse_kv=False only blocks [0, lo) (the drafter's)
    full = cache if reuse_kv else decoder.new_cache()  # the verifier's cache
    _prefill(decoder, ids, [(cache, L)] if reuse_kv else [(cache, lo), (full, L)])
    t = timer.add("prefill", t)

    out: list[int] = []
    steps = drafted = accepted = 0
    x, pos = ids[-1], len(ids) - 1  # x: the token without KV; pos: its position = cached length
    while len(out) < max_new_tokens:
        budget = min(draft_len, max_new_tokens - len(out) - 1)  # the verifier adds one token of its own
        drafts: list[int] = []
        states: list[torch.Tensor] = []  # block-lo inputs of x, d1..dm
        tok = x
        while True:
            h = decoder.forward(_as_ids(decoder, [tok]), cache, end=lo)  # [1, 1, H]
            states.append(h)
            if len(drafts) == budget:
                break
            logits = _head_logits(head, h, vocab_idx)  # [1, V] or [1, k]
            if entropy_threshold is not None and float(entropy(logits)[0]) > entropy_threshold:
                break
            best = int(logits[0].argmax())
            tok = int(vocab_idx[best]) if vocab_idx is not None else best
            drafts.append(tok)
        t = timer.add("draft", t)

        if reuse_kv:
            h = decoder.run_layers(torch.cat(states, dim=1), lo, L, cache)  # [1, m+1, H]
        else:
            h = decoder.forward(_as_ids(decoder, [x, *drafts]), full)  # [1, m+1, H]
        target = decoder.logits(h[0]).argmax(dim=-1).tolist()  # m+1 greedy choices
        t = timer.add("verify", t)

        n = 0
        while n < len(drafts) and drafts[n] == target[n]:
            n += 1
        pos += n + 1  # x and the n accepted drafts now have KV in every block
        cache.crop(pos)
        if not reuse_kv:
            full.crop(pos)
        new, stop = _until_eos(drafts[:n] + [target[n]], eos_token_id)
        out.extend(new)
        steps, drafted, accepted = steps + 1, drafted + len(drafts), accepted + n
        x = new[-1]
        t = timer.add("overhead", t)
        if stop:
            break
    s = timer.seconds
    return DecodeResult(len(ids), out, steps=steps, drafted=drafted, accepted=accepted,
                        prefill_s=s.get("prefill", 0.0), draft_s=s.get("draft", 0.0), verify_s=s.get("verify", 0.0),
                        overhead_s=s.get("overhead", 0.0), total_s=t - t0)


@torch.no_grad()
def early_exit_decode(decoder: LayeredDecoder, heads: HeadMap, prompt: Sequence[int] | torch.Tensor,
                      max_new_tokens: int, thresholds: Mapping[int, float],
                      reference: Sequence[int] | None = None, eos_token_id: int | None = None) -> EarlyExitResult:
    """Early-exit greedy decoding without verification: each token comes from the first exit
    layer (in increasing order) whose head entropy is at or below its threshold (the
    `pipeline.thresholds` convention), else from the model.

    The blocks a token skips get no KV from it, yet later tokens attend to it there. The fix
    used here is CALM's state propagation: the exit layer's state is copied up as the input of
    every skipped block, and only those blocks' K/V projections run on it
    (`LayeredDecoder.fill_kv`). CALM does it at the next step; the values are the same, so it
    is done at the exit, which keeps every cache full-length between steps.

    `reference` is full greedy decoding's output for this prompt (computed here when None; pass
    it to avoid paying for it again); `matches_greedy` compares position by position.
    """
    ids = _prompt_ids(decoder, prompt, max_new_tokens)
    exits = sorted(int(k) for k in thresholds)
    if not exits:
        raise DecodeError("thresholds is empty; give at least one exit layer's entropy threshold, e.g. {6: 0.5}")
    by_layer = _heads_by_layer(decoder, heads, exits)
    if reference is None:
        reference = greedy_decode(decoder, ids, max_new_tokens, eos_token_id).ids
    L = decoder.num_layers
    timer = _Timer(decoder.device)
    t0 = timer.now()
    cache = decoder.new_cache()
    _prefill(decoder, ids, [(cache, L)])
    out: list[int] = []
    exit_layers: list[int] = []
    x, pos = ids[-1], len(ids) - 1
    while len(out) < max_new_tokens:
        h = decoder.embed(_as_ids(decoder, [x]), pos)  # [1, 1, H]
        start, token, layer = 0, None, L
        for e in exits:
            h = decoder.run_layers(h, start, e, cache)  # [1, 1, H]
            start = e
            logits = _head_logits(by_layer[e], h)  # [1, V]
            if float(entropy(logits)[0]) <= float(thresholds[e]):
                token, layer = int(logits[0].argmax()), e
                decoder.fill_kv(h, e, L, cache)
                break
        if token is None:
            h = decoder.run_layers(h, start, L, cache)  # [1, 1, H]
            token = int(decoder.logits(h[0]).argmax(dim=-1))
        out.append(token)
        exit_layers.append(layer)
        x, pos = token, pos + 1
        if eos_token_id is not None and token == eos_token_id:
            break
    total = timer.now() - t0
    same = sum(a == b for a, b in zip(out, reference))
    return EarlyExitResult(len(ids), out, exit_layers, L, matches_greedy=same / len(out), total_s=total)
