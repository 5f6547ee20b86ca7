"""Self-speculative decoding with the exit heads, compared against plain greedy on one prompt set.

One function, `compare_decoding`, measures what the heads buy at decode time; the decode
benchmark and the evaluate stage both call it, so both report the same numbers the same way.
Every setting runs in this process on the same prompts as the greedy baseline. Greedy is
timed again after each group of settings (consecutive settings with the same exit layer), and
a group's speed-ups are against the mean of the greedy runs just before and after it: load
that drifts over a run (a shared CPU) then hits both sides of each ratio.

Output is checked token for token against the first greedy run: self-speculative greedy must
reproduce it exactly (see `pipeline.speculative`), so a mismatch is a bug or fp rounding, and
it is reported with the first position where it happens.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from pipeline.layered import LayeredDecoder
from pipeline.speculative import (
    DecodeResult,
    EarlyExitResult,
    HeadMap,
    early_exit_decode,
    entropy,
    greedy_decode,
    speculative_decode,
)
from pipeline.thresholds import empirical_thresholds

__all__ = ["DecodeCompareError", "DecodeComparison", "DecodeSetting", "EarlyExitSummary", "GreedyRun", "Mismatch",
           "SettingResult", "TimeSplit", "calibrate_draft_thresholds", "compare_decoding", "default_settings",
           "draw_prompts", "most_frequent_tokens"]

log = logging.getLogger(__name__)


class DecodeCompareError(ValueError):
    """The comparison cannot run as asked; the message lists every bad value and its fix."""


@dataclass(frozen=True)
class DecodeSetting:
    """One self-speculative configuration to time against greedy."""

    name: str
    """Label in tables and logs, unique within a comparison."""
    exit_layer: int
    """1-based layer whose head drafts; blocks [0, exit_layer) run per draft token."""
    draft_len: int
    """Draft tokens per verification; with `adaptive`, the most a draft may hold."""
    adaptive: bool = False
    """Stop a draft before a token whose head entropy exceeds the layer's threshold."""
    reuse_kv: bool = True
    """The verifier starts at the exit layer from the draft's states (False: it recomputes the
    lower blocks in a cache of its own, as a separate draft model would)."""
    vocab_size: int | None = None
    """Draft over the first `vocab_size` ids of the comparison's `draft_vocab` (most frequent
    first); None: the full vocabulary."""


@dataclass(frozen=True)
class TimeSplit:
    """Shares of wall time; they sum to 1."""

    prefill: float
    draft: float
    verify: float
    overhead: float


@dataclass(frozen=True)
class Mismatch:
    """Where an output first differs from greedy's."""

    prompt: int
    """Index of the prompt in the comparison's prompt list."""
    position: int
    """0-based index among the generated tokens."""


@dataclass(frozen=True)
class GreedyRun:
    """One timing of plain greedy decoding over all prompts."""

    tokens: int
    seconds: float
    tokens_per_s: float
    time_split: TimeSplit
    identical: bool
    """Equal to the first greedy run (the reference); False means greedy is not deterministic."""


@dataclass(frozen=True)
class SettingResult:
    """One setting over all prompts; counts are summed over prompts before any ratio."""

    setting: DecodeSetting
    entropy_threshold: float | None
    """Nats; the adaptive draft's stop threshold, None for a fixed draft length."""
    tokens: int
    seconds: float
    tokens_per_s: float
    greedy_tokens_per_s: float
    """The greedy timings adjacent to this setting's group (their mean): the speed-up's base."""
    speedup: float
    drafted: int
    accepted: int
    verifications: int
    """Full-depth passes after the prefill, one per draft."""
    acceptance: float | None
    """accepted / drafted; None when the head never drafted."""
    tau: float | None
    """Mean accepted length: accepted draft tokens per verification, accepted / verifications.
    The bonus token each verification adds is not counted, so tokens per full-depth pass is
    tau + 1 and plain greedy has tau = 0."""
    time_split: TimeSplit
    identical: bool
    """Every prompt's output equals greedy's, token for token."""
    first_mismatch: Mismatch | None


@dataclass(frozen=True)
class EarlyExitSummary:
    """Early exit without verification: faster, not exact."""

    thresholds: Mapping[int, float]
    """Entropy threshold (nats) per exit layer; a token exits at the first layer at or below it."""
    tokens: int
    seconds: float
    tokens_per_s: float
    speedup: float
    """Against the mean of all greedy runs."""
    layers_skipped: float
    """Share of the generated tokens' block passes skipped."""
    matches_greedy: float
    """Share of generated tokens equal to greedy's at their position."""


@dataclass(frozen=True)
class DecodeComparison:
    """Everything `compare_decoding` measured; `to_dict` is its JSON form."""

    prompt_lens: tuple[int, ...]
    new_tokens: int
    greedy: tuple[GreedyRun, ...]
    """In time order: before the first group, then after each group (only the first when
    greedy is not re-timed between groups)."""
    settings: tuple[SettingResult, ...]
    early_exit: EarlyExitSummary | None
    draft_vocab_size: int | None
    draft_vocab_covers_greedy: float | None
    """Share of greedy's output tokens inside the draft vocabulary: the ceiling on what a
    reduced-vocabulary draft can get accepted."""
    greedy_ids: tuple[tuple[int, ...], ...]
    """Greedy's output per prompt, the reference every output is checked against (not in `to_dict`)."""

    @property
    def greedy_tokens_per_s(self) -> float:
        return float(np.mean([g.tokens_per_s for g in self.greedy]))

    @property
    def all_identical(self) -> bool:
        return all(r.identical for r in self.settings) and all(g.identical for g in self.greedy)

    @property
    def best(self) -> SettingResult | None:
        """The setting with the highest speed-up among those whose output equals greedy's and
        that drafted at all (speed-up, not tokens/s: each is against its own adjacent greedy
        timing). An adaptive draft whose threshold never lets a token through is greedy decoding
        plus the head's cost: it says nothing about speculation, so it is never the best."""
        exact = [r for r in self.settings if r.identical and r.drafted > 0]
        return max(exact, key=lambda r: r.speedup) if exact else None

    def to_dict(self) -> dict:
        """Plain JSON types; infinite thresholds (a head that never drafts or exits) become the
        strings "inf" / "-inf", so the result passes `json.dumps(..., allow_nan=False)`."""
        best = self.best
        out = {
            "prompts": len(self.prompt_lens), "prompt_lens": list(self.prompt_lens), "new_tokens": self.new_tokens,
            "greedy_tokens_per_s": self.greedy_tokens_per_s,
            "greedy": [asdict(g) for g in self.greedy],
            "settings": [{**asdict(r.setting), **{k: v for k, v in asdict(r).items() if k != "setting"}}
                         for r in self.settings],
            "early_exit": asdict(self.early_exit) if self.early_exit else None,
            "draft_vocab_size": self.draft_vocab_size, "draft_vocab_covers_greedy": self.draft_vocab_covers_greedy,
            "all_identical": self.all_identical, "best": best.setting.name if best else None,
        }
        return _plain(out)


def _plain(x):
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


# -- inputs -------------------------------------------------------------------------------------
def draw_prompts(token_ids_per_document: Sequence[Sequence[int]], n: int, length: int, seed: int) -> list[list[int]]:
    """`n` windows of exactly `length` tokens, each at a seeded offset in a seeded document.

    Documents are visited in a seeded order, one window each; when fewer than `n` documents are
    long enough, the order is visited again (new offsets), so the count is always `n`.
    """
    if n < 1 or length < 1:
        raise DecodeCompareError(f"n={n} and length={length} must both be >= 1")
    long_enough = [i for i, ids in enumerate(token_ids_per_document) if len(ids) >= length]
    if not long_enough:
        longest = max((len(ids) for ids in token_ids_per_document), default=0)
        raise DecodeCompareError(
            f"no document holds a prompt of length={length} tokens (the longest of {len(token_ids_per_document)} "
            f"has {longest}); lower the prompt length to <= {longest} or pass longer documents")
    rng = np.random.default_rng(seed)
    order = [long_enough[i] for i in rng.permutation(len(long_enough))]
    out: list[list[int]] = []
    for d in itertools.islice(itertools.cycle(order), n):
        ids = token_ids_per_document[d]
        start = int(rng.integers(0, len(ids) - length + 1))
        out.append([int(t) for t in ids[start : start + length]])
    return out


def most_frequent_tokens(ids: np.ndarray | Sequence[int], n: int) -> torch.Tensor:
    """The `n` most frequent token ids [<= n], most frequent first, ties by smaller id.

    A reduced draft vocabulary: the head then scores these rows only. Pass the ids the drafts
    should cover, e.g. the teacher's top-1 ids on the train cache or the corpus tokens.
    """
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)  # [tokens]
    if n < 1:
        raise DecodeCompareError(f"n={n} must be >= 1 (the draft vocabulary's size)")
    if arr.size == 0:
        raise DecodeCompareError("no token ids to count; pass the tokens the draft vocabulary should cover")
    values, counts = np.unique(arr, return_counts=True)  # ascending ids
    order = np.argsort(-counts, kind="stable")[:n]  # stable: equal counts keep ascending id
    return torch.from_numpy(values[order].copy())  # [<= n]


def default_settings(layers: Sequence[int], draft_lens: Sequence[int] = (2, 4, 8), *, adaptive: bool = True,
                     ablate_draft_len: int | None = None, draft_vocab_size: int | None = None) -> list[DecodeSetting]:
    """Per exit layer: each fixed draft length and (with `adaptive`) an entropy-stopped draft of
    at most max(draft_lens); at `ablate_draft_len` (default: the middle length) also the run
    without KV reuse and, with `draft_vocab_size`, the reduced draft vocabulary. Ordered by
    layer, so each layer is one group between greedy re-timings."""
    if not draft_lens:
        raise DecodeCompareError("draft_lens is empty; pass at least one draft length, e.g. (2, 4, 8)")
    lens = [int(k) for k in draft_lens]
    ablate = lens[len(lens) // 2] if ablate_draft_len is None else int(ablate_draft_len)
    out: list[DecodeSetting] = []
    for layer in layers:
        for k in lens:
            out.append(DecodeSetting(f"l={layer} k={k}", layer, k))
            if k == ablate:
                out.append(DecodeSetting(f"l={layer} k={k} no KV reuse", layer, k, reuse_kv=False))
                if draft_vocab_size:
                    out.append(DecodeSetting(f"l={layer} k={k} draft vocab {draft_vocab_size}", layer, k,
                                             vocab_size=draft_vocab_size))
        if adaptive:
            out.append(DecodeSetting(f"l={layer} adaptive k<={max(lens)}", layer, max(lens), adaptive=True))
    return out


@torch.no_grad()
def calibrate_draft_thresholds(decoder: LayeredDecoder, heads: HeadMap, layers: Sequence[int],
                               token_ids: Sequence[int], level: float) -> dict[int, float]:
    """Per layer, the loosest head-entropy threshold (nats) whose tokens agree with the model's
    top-1 at least `level` of the time on `token_ids` (one forward over held-out text).

    The plain empirical fit of `pipeline.thresholds`, no guarantee: a quick stand-in for when no
    calibration artifact exists (prefer its thresholds). -inf where no threshold reaches the
    level: that head then never drafts, or never exits. Serves drafts and early exit alike.
    """
    ids = [int(t) for t in token_ids]
    if len(ids) < 2:
        raise DecodeCompareError(f"calibration needs at least 2 token ids, got {len(ids)}; pass held-out text's tokens")
    by_layer = {int(k): v for k, v in heads.items()}
    missing = [layer for layer in layers if int(layer) not in by_layer]
    if missing:
        raise DecodeCompareError(f"no head at layers {missing} (heads exist for {sorted(by_layer)}); "
                                 "calibrate only layers that have a head")
    states, final = decoder.backbone.hidden_states(torch.tensor([ids]), list(layers))  # {l: [1, n, H]}, [1, n, H]
    # final already has the final norm; any logit scale / softcap keeps the argmax
    target = decoder.lm_head(final[0]).argmax(dim=-1).cpu()  # [n]
    out: dict[int, float] = {}
    for layer in layers:
        head = by_layer[int(layer)]
        logits = head.project(head.features(states[layer][0].float()))  # [n, V]
        correct = (logits.argmax(dim=-1).cpu() == target).numpy()  # [n]
        fit = empirical_thresholds(entropy(logits).cpu().numpy(), correct, [level])[0]
        out[int(layer)] = float("-inf") if fit.threshold is None else float(fit.threshold)
    return out


# -- the comparison -----------------------------------------------------------------------------
def _check(decoder: LayeredDecoder, heads: HeadMap, prompts: Sequence[Sequence[int]], new_tokens: int,
           settings: Sequence[DecodeSetting], thresholds: Mapping[int, float], draft_vocab: torch.Tensor | None,
           exit_thresholds: Mapping[int, float] | None) -> None:
    """Every problem with the request, raised at once, before minutes of decoding."""
    head_layers = sorted(int(k) for k in heads)
    L = decoder.num_layers
    problems: list[str] = []
    if not prompts:
        problems.append("prompts is empty; pass at least one (see draw_prompts)")
    if new_tokens < 1:
        problems.append(f"new_tokens={new_tokens} must be >= 1")
    for i, p in enumerate(prompts):
        if not 1 <= len(p) <= decoder.max_positions - new_tokens:
            problems.append(f"prompt {i} has {len(p)} tokens; it needs 1..{decoder.max_positions - new_tokens} so that "
                            f"+ new_tokens={new_tokens} fits the context of {decoder.max_positions}")
    if not settings:
        problems.append("settings is empty; pass some, e.g. default_settings(layers)")
    names = [s.name for s in settings]
    if len(set(names)) != len(names):
        problems.append(f"setting names repeat ({sorted({n for n in names if names.count(n) > 1})}); give each its own")
    vocab_n = None if draft_vocab is None else int(draft_vocab.numel())

    def check_layer(layer: int, what: str) -> None:
        if not 1 <= layer <= L - 1:
            problems.append(f"{what}: exit layer {layer} is outside 1..{L - 1} for this {L}-layer backbone")
        elif layer not in head_layers:
            problems.append(f"{what}: no head at layer {layer} (heads: {head_layers}); drop it or train one there")

    for s in settings:
        check_layer(s.exit_layer, s.name)
        if s.draft_len < 1:
            problems.append(f"{s.name}: draft_len={s.draft_len} must be >= 1")
        if s.adaptive:
            thr = thresholds.get(s.exit_layer)
            if thr is None or math.isnan(thr):
                problems.append(f"{s.name}: adaptive but entropy_thresholds has {thr} for layer {s.exit_layer}; "
                                "pass the calibrated threshold (calibration artifact or calibrate_draft_thresholds)")
        if s.vocab_size is not None and not 1 <= s.vocab_size <= (vocab_n or 0):
            problems.append(f"{s.name}: vocab_size={s.vocab_size} but draft_vocab holds {vocab_n or 0} ids; pass a "
                            "draft_vocab at least that long (see most_frequent_tokens) or lower vocab_size")
    for layer, thr in (exit_thresholds or {}).items():
        check_layer(int(layer), "early exit")
        if math.isnan(float(thr)):
            problems.append(f"early exit: threshold of layer {layer} is NaN; pass a number (-inf: never exit there)")
    if exit_thresholds is not None and not exit_thresholds:
        problems.append("early_exit_thresholds is empty; pass None to skip the early-exit run")
    if problems:
        raise DecodeCompareError("decode comparison: " + "; ".join(problems))


def _totals(results: Sequence[DecodeResult]) -> tuple[int, float, TimeSplit]:
    tokens = sum(len(r.ids) for r in results)
    seconds = sum(r.total_s for r in results)
    part = {p: sum(getattr(r, f"{p}_s") for r in results) / seconds if seconds > 0 else 0.0
            for p in ("prefill", "draft", "verify", "overhead")}
    return tokens, seconds, TimeSplit(**part)


def _tps(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else float("inf")


def _first_mismatch(outputs: Sequence[Sequence[int]], reference: Sequence[Sequence[int]]) -> Mismatch | None:
    for i, (out, ref) in enumerate(zip(outputs, reference)):
        if list(out) != list(ref):
            pos = next((j for j, (a, b) in enumerate(zip(out, ref)) if a != b), min(len(out), len(ref)))
            return Mismatch(i, pos)
    return None


def _setting_result(s: DecodeSetting, thr: float | None, results: Sequence[DecodeResult],
                    reference: Sequence[Sequence[int]], greedy_tps: float) -> SettingResult:
    """Counts summed over prompts, then the ratios (not a mean of per-prompt ratios)."""
    tokens, seconds, split = _totals(results)
    drafted, accepted, steps = (sum(getattr(r, a) for r in results) for a in ("drafted", "accepted", "steps"))
    mismatch = _first_mismatch([r.ids for r in results], reference)
    if mismatch is not None:
        log.warning("%s: output differs from greedy at prompt %d, token %d", s.name, mismatch.prompt, mismatch.position)
    return SettingResult(
        setting=s, entropy_threshold=thr, tokens=tokens, seconds=seconds, tokens_per_s=_tps(tokens, seconds),
        greedy_tokens_per_s=greedy_tps, speedup=_tps(tokens, seconds) / greedy_tps, drafted=drafted,
        accepted=accepted, verifications=steps, acceptance=accepted / drafted if drafted else None,
        tau=accepted / steps if steps else None, time_split=split, identical=mismatch is None, first_mismatch=mismatch)


def _early_exit_summary(thresholds: Mapping[int, float], results: Sequence[EarlyExitResult],
                        greedy_tps: float) -> EarlyExitSummary:
    tokens, seconds = sum(len(r.ids) for r in results), sum(r.total_s for r in results)
    skipped = sum(r.layers_skipped * len(r.ids) for r in results) / tokens  # token-weighted over prompts
    matches = sum(r.matches_greedy * len(r.ids) for r in results) / tokens
    return EarlyExitSummary(dict(thresholds), tokens, seconds, _tps(tokens, seconds), _tps(tokens, seconds) / greedy_tps,
                            skipped, matches)


def compare_decoding(decoder: LayeredDecoder, heads: HeadMap, prompts: Sequence[Sequence[int]], new_tokens: int,
                     settings: Sequence[DecodeSetting], *, entropy_thresholds: Mapping[int, float] | None = None,
                     draft_vocab: torch.Tensor | None = None, early_exit_thresholds: Mapping[int, float] | None = None,
                     retime_greedy_every_group: bool = True, progress: bool = False) -> DecodeComparison:
    """Time greedy and every setting on `prompts` (`new_tokens` each, batch 1) and check outputs.

    `entropy_thresholds` (nats, by exit layer) stop the adaptive settings' drafts; `draft_vocab`
    [N] (token ids, most frequent first, see `most_frequent_tokens`) is what settings with a
    `vocab_size` draft over; `early_exit_thresholds` adds one early-exit run. Groups are runs of
    consecutive settings with the same exit layer; with `retime_greedy_every_group` greedy is
    timed again after each, else once, before all. `progress` logs each row at INFO.
    """
    thresholds = {int(k): float(v) for k, v in (entropy_thresholds or {}).items()}
    exit_thr = None if early_exit_thresholds is None else {int(k): float(v) for k, v in early_exit_thresholds.items()}
    _check(decoder, heads, prompts, new_tokens, settings, thresholds, draft_vocab, exit_thr)
    prompts = [[int(t) for t in p] for p in prompts]
    vocab = None if draft_vocab is None else draft_vocab.reshape(-1).to(torch.long)  # [N]
    say = log.info if progress else log.debug

    greedy_decode(decoder, prompts[0], min(4, new_tokens))  # warm-up: first-call allocations are not decoding
    runs: list[list[DecodeResult]] = []

    def time_greedy() -> float:
        runs.append([greedy_decode(decoder, p, new_tokens) for p in prompts])
        tokens, seconds, _ = _totals(runs[-1])
        say("greedy run %d: %.1f tokens/s", len(runs), _tps(tokens, seconds))
        return _tps(tokens, seconds)

    before = time_greedy()
    reference = [r.ids for r in runs[0]]
    rows: list[SettingResult] = []
    for _, group in itertools.groupby(settings, key=lambda s: s.exit_layer):
        measured = []
        for s in group:
            thr = thresholds[s.exit_layer] if s.adaptive else None
            idx = None if s.vocab_size is None else vocab[: s.vocab_size]  # [vocab_size]
            results = [speculative_decode(decoder, heads, p, new_tokens, exit_layer=s.exit_layer, draft_len=s.draft_len,
                                          entropy_threshold=thr, vocab_idx=idx, reuse_kv=s.reuse_kv) for p in prompts]
            measured.append((s, thr, results))
        after = time_greedy() if retime_greedy_every_group else before
        base = (before + after) / 2
        before = after
        for s, thr, results in measured:
            rows.append(_setting_result(s, thr, results, reference, base))
            say("%s: %.1f tokens/s (%.2fx), acceptance %s, tau %s, identical %s", s.name, rows[-1].tokens_per_s,
                rows[-1].speedup, rows[-1].acceptance, rows[-1].tau, rows[-1].identical)

    greedy = []
    for results in runs:
        tokens, seconds, split = _totals(results)
        greedy.append(GreedyRun(tokens, seconds, _tps(tokens, seconds), split, [r.ids for r in results] == reference))
    greedy_tps = float(np.mean([g.tokens_per_s for g in greedy]))

    early = None
    if exit_thr is not None:
        ee = [early_exit_decode(decoder, heads, p, new_tokens, exit_thr, reference=ref)
              for p, ref in zip(prompts, reference)]
        early = _early_exit_summary(exit_thr, ee, greedy_tps)
        say("early exit: %.1f tokens/s, %.1f%% of layers skipped, %.1f%% equal to greedy", early.tokens_per_s,
            100 * early.layers_skipped, 100 * early.matches_greedy)

    covers = None
    if vocab is not None:
        inside = set(vocab.tolist())
        flat = [t for ref in reference for t in ref]
        covers = sum(t in inside for t in flat) / len(flat)
    return DecodeComparison(tuple(len(p) for p in prompts), new_tokens, tuple(greedy), tuple(rows), early,
                            None if vocab is None else int(vocab.numel()), covers, tuple(map(tuple, reference)))
