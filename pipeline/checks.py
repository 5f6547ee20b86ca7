"""What a run can be refused for before it starts: every problem that the config, the model's
own config (config.json, a GGUF header, or the embedded model's known facts) and the corpus's
schema decide, found in about a second without loading weights or reading the corpus.

Each of these would otherwise surface tens of seconds later (server start, tokenizer and
model load) from inside a stage. The stages keep their own checks: they also run outside a
flow, and on artifacts named by `inputs.*`, which this module does not open.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Config, ConfigError
from pipeline.data import DataError, check_data_source, looks_like_path
from pipeline.model_files import (
    BackboneError,
    ModelFacts,
    check_causal_lm,
    check_weight_files,
    locate_model,
    read_model_facts,
)


class PreflightError(ConfigError):
    """The run cannot work as configured; the message lists every problem and its fix."""


def check_run(cfg: Config, absent_data_ok: bool = False) -> None:
    """Raise one `PreflightError` naming every problem `run_problems` finds."""
    problems = run_problems(cfg, absent_data_ok)
    if len(problems) == 1:
        raise PreflightError(problems[0])
    if problems:
        raise PreflightError(f"{len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems))


def run_problems(cfg: Config, absent_data_ok: bool = False) -> list[str]:
    """Every problem of the config with itself, with its model and with its corpus.
    `absent_data_ok`: a data path that does not exist (yet) is no problem; recalibration,
    scheduled before data arrives, reports it as nothing to do."""
    return config_problems(cfg) + model_problems(cfg) + data_problems(cfg, absent_data_ok)


def config_problems(cfg: Config) -> list[str]:
    """Settings of different sections that contradict each other (each section alone is valid)."""
    problems = []
    seq_len, cap = cfg.data.seq_len, cfg.extract.max_tokens
    if cap is not None and cap < seq_len:
        problems.append(
            f"extract.max_tokens={cap} is less than one sequence of data.seq_len={seq_len}: caches hold whole "
            f"sequences, so the cap would be exceeded; set extract.max_tokens >= {seq_len} or data.seq_len <= {cap}"
        )
    derived_heads = cfg.inputs.heads is None  # heads named by inputs.heads bring their own layers
    if derived_heads and cfg.heads.mode == "offline" and cfg.inputs.train_cache is None and cfg.heads.layers:
        missing = [x for x in cfg.heads.layers if x not in cfg.extract.layers]
        if missing:
            problems.append(
                f"heads.layers {missing} are not in extract.layers {cfg.extract.layers}: offline heads train on "
                "cached layers; add them to extract.layers or drop them from heads.layers"
            )
    head_layers = cfg.heads.layers or cfg.extract.layers
    if derived_heads and cfg.evaluate.exit_layers:
        missing = [x for x in cfg.evaluate.exit_layers if x not in head_layers]
        if missing:
            problems.append(
                f"evaluate.exit_layers {missing} have no head (heads are trained at layers {head_layers}); "
                "pick draft exit layers among those, or leave evaluate.exit_layers unset"
            )
    level, levels = cfg.evaluate.draft_level, cfg.calibrate.levels
    if level is not None and not any(abs(level - x) < 1e-9 for x in levels):
        problems.append(
            f"evaluate.draft_level={level:g} is not one of calibrate.levels {levels}; pick one of those, "
            f"or add {level:g} to calibrate.levels"
        )
    return problems


def model_problems(cfg: Config) -> list[str]:
    """The backbone exists, is a causal LM, its weight files are whole, and it has the layers and
    context the config asks for."""
    try:
        loc = locate_model(cfg.model)
        facts = read_model_facts(loc, cfg.model.revision)
        check_causal_lm(facts, cfg.model.source)
    except BackboneError as e:
        return [str(e)]
    problems = []
    for check in (lambda: check_weight_files(loc), lambda: _check_device(cfg.model.device)):
        try:
            check()
        except BackboneError as e:
            problems.append(str(e))
    return problems + ([] if facts is None else _fit_problems(cfg, facts))


def _check_device(device: str) -> None:
    if device not in ("auto", "cpu"):
        from pipeline.backbone import resolve_device  # imports torch: only when a device is named

        resolve_device(device)


def _fit_problems(cfg: Config, facts: ModelFacts) -> list[str]:
    problems = []
    n = facts.num_layers
    if n is not None:
        for name, layers in (("extract.layers", cfg.extract.layers), ("heads.layers", cfg.heads.layers),
                             ("evaluate.exit_layers", cfg.evaluate.exit_layers)):
            bad = [x for x in layers or [] if not 1 <= x <= n - 1]
            if bad:
                problems.append(
                    f"{name} {bad} are outside 1..{n - 1}: {cfg.model.source} has {n} decoder layers (exit layers are "
                    f"1-based block outputs; layer {n} is the model's own output); pick layers in that range, "
                    f"e.g. set {name}={sorted({max(1, n // 4), max(1, n // 2)})}"
                )
    if facts.max_context is not None and cfg.data.seq_len > facts.max_context:
        problems.append(
            f"data.seq_len={cfg.data.seq_len} exceeds the context of {cfg.model.source} ({facts.max_context} tokens); "
            f"set data.seq_len <= {facts.max_context}"
        )
    return problems


def data_problems(cfg: Config, absent_data_ok: bool = False) -> list[str]:
    """The corpus exists and its files have the text column (headers and first rows only)."""
    if absent_data_ok and looks_like_path(cfg.data.source) and not Path(cfg.data.source).expanduser().exists():
        return []
    try:
        check_data_source(cfg.data)
    except DataError as e:
        return [str(e)]
    return []
