"""train_heads -> train_gates -> calibrate wired through the stores, on the tiny model."""

from __future__ import annotations

import json

import pytest

from flows.stages.base import InputMismatch, StageContext, run_stage
from flows.stages.calibrate import CalibrateStage
from flows.stages.extract import ExtractStage, load_teacher, open_cache, resolve_cache
from flows.stages.teacher_topk import TeacherTopkStage
from flows.stages.train_gates import TrainGatesStage
from flows.stages.train_heads import TrainHeadsStage
from pipeline.config import load_config
from stores.artifacts import ArtifactStore


def _run(stage, cfg, store, **inputs) -> str:
    return run_stage(stage, StageContext(cfg, store, progress=False), inputs)


def _plan(stage, cfg, store, **inputs):
    return stage.plan(StageContext(cfg, store, progress=False), inputs)


def _cfg(model_dir, corpus, *extra):
    return load_config(None, [
        f"model.source={model_dir}", f"data.source={corpus}", "data.seq_len=32",
        "data.fractions={train: 0.5, calib: 0.3, eval: 0.2}",
        "extract.layers=[1,2,3]", "extract.chunk_tokens=256", "extract.max_tokens=4096",
        "heads.epochs=1", "heads.batch_tokens=256", "heads.warmup_steps=2", "heads.negatives=64", "heads.topk=16",
        "gates.epochs=1", "gates.batch_tokens=256", "gates.warmup_steps=2",
        "calibrate.levels=[0.5, 0.8]", *extra,
    ])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, corpus_dir):
    store = ArtifactStore(tmp_path_factory.mktemp("root"))
    cfg = _cfg(tiny_model_dir, corpus_dir)
    keys = {s: _run(ExtractStage(s), cfg, store) for s in ("train", "calib", "eval")}
    keys["teacher_topk"] = _run(TeacherTopkStage(), cfg, store, cache=keys["train"])
    keys["heads"] = _run(TrainHeadsStage(), cfg, store, cache=keys["train"], teacher_topk=keys["teacher_topk"],
                         eval_cache=keys["eval"])
    keys["gates"] = _run(TrainGatesStage(), cfg, store, cache=keys["train"], heads=keys["heads"], eval_cache=keys["eval"])
    keys["calibration"] = _run(CalibrateStage(), cfg, store, calib_cache=keys["calib"], heads=keys["heads"],
                               gates=keys["gates"], eval_cache=keys["eval"])
    return cfg, store, keys


def test_artifacts_carry_metrics_and_inputs(trained):
    cfg, store, keys = trained
    heads = store.manifest("train_heads", keys["heads"])
    assert heads.inputs == {"cache": keys["train"], "teacher_topk": keys["teacher_topk"], "eval_cache": keys["eval"]}
    assert set(heads.metrics["eval"]) == set(heads.metrics["logit_lens"]) == {"1", "2", "3"}
    assert heads.metrics["epochs"] and heads.metrics["tokens_per_s"] > 0
    assert (store.path("train_heads", keys["heads"]) / "heads.safetensors").is_file()
    assert not (store.path("train_heads", keys["heads"]) / "checkpoints").exists()
    gates = store.manifest("train_gates", keys["gates"])
    assert set(gates.metrics["eval"]) == {"1", "2", "3"}
    below = {(str(r["head"]), r["gate_auroc"], r["entropy_auroc"]) for r in gates.metrics["below_entropy"]}
    assert below == {(layer, round(ev["gate_auroc"], 4), round(ev["entropy_auroc"], 4))
                     for layer, ev in gates.metrics["eval"].items() if ev["gate_auroc"] < ev["entropy_auroc"]}
    cal = json.loads((store.path("calibrate", keys["calibration"]) / "calibration.json").read_text())
    assert cal["levels"] == [0.5, 0.8] and set(cal["heads"]) == {"1", "2", "3"}
    for entry in cal["heads"].values():
        for predictor in ("entropy", "gate"):
            for method in ("ltt", "empirical"):
                rows = entry[predictor][method]
                assert [r["level"] for r in rows] == [0.5, 0.8]
                assert all(r["n"] == cal["n"] for r in rows)
    assert set(cal["cascade"]) == {"entropy", "gate"}
    assert cal["held_out"] and all("met" in r for r in cal["held_out"])
    # held-out "held" is judged as a promotion judges it: the deployed certified thresholds, each at delta / K
    rule = cal["held_out_rule"]
    deployed = {(d["predictor"], d["head"], d["level"]) for d in cal["deployed"]["choices"] if d["threshold"] is not None}
    assert rule["name"] == "bonferroni" and rule["scope"] == "deployed" and rule["checked"] == len(deployed)
    assert rule["per_check_delta"] == cal["delta"] / max(len(deployed), 1)
    assert all(r["held"] == (r["p_below"] > rule["per_check_delta"]) for r in cal["held_out"])
    # which of those checks have too few exits to see a 2-point miss (a tiny eval split: all or most)
    from pipeline.recalibrate import min_exits_to_detect

    weak = store.manifest("calibrate", keys["calibration"]).metrics["held_out_too_few_exits"]
    assert weak == [f"{r['predictor']} head {r['head']} level {r['level']:g}: {r['n_exited']:,} exits of "
                    f"{min_exits_to_detect(r['level'], 0.02, rule['per_check_delta'], 0.8):,} needed"
                    for r in cal["held_out"] if (r["predictor"], r["head"], r["level"]) in deployed
                    and r["n_exited"] < min_exits_to_detect(r["level"], 0.02, rule["per_check_delta"], 0.8)]


def test_same_inputs_are_a_hit_and_a_change_reruns_only_downstream(trained):
    cfg, store, keys = trained
    heads_inputs = {"cache": keys["train"], "teacher_topk": keys["teacher_topk"], "eval_cache": keys["eval"]}
    assert _run(TrainHeadsStage(), cfg, store, **heads_inputs) == keys["heads"]
    changed = cfg.model_copy(update={"gates": cfg.gates.model_copy(update={"lr": 2e-3})})
    assert _plan(TrainHeadsStage(), changed, store, **heads_inputs).key == keys["heads"]
    assert _plan(TrainGatesStage(), changed, store, cache=keys["train"], heads=keys["heads"],
                 eval_cache=keys["eval"]).key != keys["gates"]


def test_wrong_inputs_are_refused(trained, tmp_path, tiny_model_dir, corpus_dir, make_tiny_model):
    cfg, store, keys = trained
    with pytest.raises(InputMismatch, match="not in the cache"):
        _plan(TrainHeadsStage(), _cfg(tiny_model_dir, corpus_dir, "heads.layers=[2,5]"), store, cache=keys["train"],
              teacher_topk=keys["teacher_topk"])
    # a cache of another backbone named explicitly
    other = make_tiny_model(tmp_path / "other", seed=1)
    other_cfg = _cfg(other, corpus_dir, f"inputs.train_cache={keys['train'][:10]}")
    with pytest.raises(InputMismatch, match="another|extracted from backbone"):
        resolve_cache(other_cfg, store, "train")


def test_too_few_calib_tokens_for_the_guarantee(trained):
    from pipeline.calibrate import CalibrationError

    cfg, store, keys = trained
    strict = cfg.model_copy(update={"calibrate": cfg.calibrate.model_copy(update={"levels": [0.999], "delta": 0.01})})
    with pytest.raises(CalibrationError, match=r"\d{4}"):
        _run(CalibrateStage(), strict, store, calib_cache=keys["calib"], heads=keys["heads"], gates=keys["gates"])


def test_efficient_loss_shares_one_teacher_topk_artifact_and_the_full_loss_needs_none(trained, tiny_model_dir,
                                                                                        corpus_dir):
    _, store, keys = trained
    topk = list(store.iter_manifests("teacher_topk"))
    assert len(topk) == 1 and topk[0].inputs == {"cache": keys["train"]} and topk[0].config == {"k": 16}
    # a second efficient run with another learning rate reuses the same top-k
    cfg2 = _cfg(tiny_model_dir, corpus_dir, "heads.lr=0.002")
    assert _plan(TeacherTopkStage(), cfg2, store, cache=keys["train"]).key == keys["teacher_topk"]
    other = _run(TrainHeadsStage(), cfg2, store, cache=keys["train"], teacher_topk=keys["teacher_topk"])
    assert other != keys["heads"] and len(list(store.iter_manifests("teacher_topk"))) == 1
    # the full loss keys no top-k and refuses none
    full = _cfg(tiny_model_dir, corpus_dir, "heads.efficient_loss=false")
    key = _run(TrainHeadsStage(), full, store, cache=keys["train"], teacher_topk=keys["teacher_topk"],
               eval_cache=keys["eval"])
    m = store.manifest("train_heads", key)
    assert "teacher_topk" not in m.inputs and m.metrics["eval"]["3"]["agreement"] > 0
    with pytest.raises(InputMismatch, match="teacher_topk"):
        _plan(TrainHeadsStage(), cfg2, store, cache=keys["train"])


def test_online_heads_need_no_train_cache_and_match_offline_quality(trained, tiny_model_dir, corpus_dir):
    _, store, keys = trained
    cfg = _cfg(tiny_model_dir, corpus_dir, "heads.mode=online")
    key = _run(TrainHeadsStage(), cfg, store, eval_cache=keys["eval"])
    m = store.manifest("train_heads", key)
    assert "cache" not in m.inputs and m.inputs["eval_cache"] == keys["eval"]
    assert key == _run(TrainHeadsStage(), cfg, store, eval_cache=keys["eval"])  # a hit
    offline = store.manifest("train_heads", keys["heads"]).metrics["eval"]
    for layer in ("1", "2", "3"):
        assert abs(m.metrics["eval"][layer]["agreement"] - offline[layer]["agreement"]) < 0.05
    # online heads calibrate like offline ones
    cal = _run(CalibrateStage(), cfg, store, calib_cache=keys["calib"], heads=key, eval_cache=keys["eval"])
    assert store.exists("calibrate", cal)


def test_every_registered_stage_plans_its_key_without_loading_a_model(trained, monkeypatch):
    """Planning is what makes a cache hit cost seconds: it must never load the backbone."""
    import transformers

    from flows.stages import STAGES, make_stage

    def no_model(*args, **kwargs):
        raise AssertionError("planning loaded a model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
    monkeypatch.setattr("flows.stages.extract.load_backbone", no_model)
    monkeypatch.setattr("flows.stages.train_heads.load_backbone", no_model)
    cfg, store, keys = trained
    assert list(STAGES) == ["teacher", "extract", "teacher_topk", "train_heads", "train_gates", "calibrate", "quantize",
                            "evaluate", "recalibrate", "report"]
    inputs = {
        "teacher": {}, "extract": {}, "teacher_topk": {"cache": keys["train"]},
        "train_heads": {"cache": keys["train"], "teacher_topk": keys["teacher_topk"], "eval_cache": keys["eval"]},
        "train_gates": {"cache": keys["train"], "heads": keys["heads"], "eval_cache": keys["eval"]},
        "calibrate": {"calib_cache": keys["calib"], "heads": keys["heads"], "gates": keys["gates"],
                      "eval_cache": keys["eval"]},
        "quantize": {"cache": keys["train"], "heads": keys["heads"], "gates": keys["gates"],
                     "teacher_topk": keys["teacher_topk"], "eval_cache": keys["eval"]},
        "evaluate": {"eval_cache": keys["eval"], "heads": keys["heads"], "gates": keys["gates"],
                     "calibration": keys["calibration"], "teacher_topk": keys["teacher_topk"]},
        "recalibrate": {"calibration": keys["calibration"]},
        "report": {"heads": keys["heads"], "calibration": keys["calibration"], "eval_cache": keys["eval"]},
    }
    existing = {"extract": keys["train"], "teacher_topk": keys["teacher_topk"], "train_heads": keys["heads"],
                "train_gates": keys["gates"], "calibrate": keys["calibration"],
                "teacher": store.manifest("extract", keys["train"]).extra["teacher"]}
    for name, cls in STAGES.items():
        stage = make_stage(name, **({"split": "train"} if name == "extract" else {}))
        plan = _plan(stage, cfg, store, **inputs[name])
        assert plan.stage == name == cls.name and plan.code_version == cls.code_version
        assert len(plan.key) == 64 and set(plan.inputs) <= {n.rstrip("?") for n in cls.inputs} | {"data"}
        if name in existing:
            assert plan.key == existing[name], name


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_reported_logit_lens_is_the_models_own(family, tmp_path, make_tiny_family, corpus_dir):
    """The logit-lens agreement in the train_heads manifest equals the one computed directly
    from the model: its own final norm (GPT-2: `ln_f`, a LayerNorm with random weight and bias)
    and LM head on its intermediate hidden states. Before the norm was read from the backbone,
    every LayerNorm family got an RMSNorm without centring or bias here."""
    import numpy as np
    import torch
    import transformers

    model_dir = make_tiny_family(tmp_path / family, family, num_layers=4)
    cfg = _cfg(model_dir, corpus_dir, "heads.max_steps=1")
    store = ArtifactStore(tmp_path / "root")
    train, ev = (_run(ExtractStage(s), cfg, store) for s in ("train", "eval"))
    topk = _run(TeacherTopkStage(), cfg, store, cache=train)
    heads = _run(TrainHeadsStage(), cfg, store, cache=train, teacher_topk=topk, eval_cache=ev)
    reported = store.manifest("train_heads", heads).metrics["logit_lens"]

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    final_norm = model.transformer.ln_f if family == "gpt2" else model.model.norm
    assert isinstance(final_norm, torch.nn.LayerNorm) == (family == "gpt2")
    reader = open_cache(store, ev)
    ids = torch.from_numpy(reader.column("input_ids").astype(np.int64)).view(-1, cfg.data.seq_len)

    def f16(t):  # the cache stores float16
        return t.to(torch.float16).to(torch.float32)

    with torch.no_grad():
        states = model(ids, output_hidden_states=True).hidden_states
        want_top1 = model.lm_head(f16(states[-1])).argmax(-1)
        for layer in (1, 2, 3):
            lens_top1 = model.lm_head(final_norm(f16(states[layer]))).argmax(-1)
            agreement = (lens_top1 == want_top1).float().mean().item()
            assert abs(reported[str(layer)]["agreement"] - agreement) <= 2 / ids.numel(), (layer, agreement)
        # and the teacher stored beside the cache gives the model's lens logits, not just its argmax
        h = f16(states[2]).reshape(-1, model.config.hidden_size)
        torch.testing.assert_close(load_teacher(store, ev).lens_logits(h), model.lm_head(final_norm(h)),
                                   rtol=1e-5, atol=1e-5)


def test_evaluate_stage_measures_heads_guarantees_cascade_and_decoding(trained, tiny_model_dir, corpus_dir):
    from flows.stages.evaluate import EvaluateStage

    cfg, store, keys = trained
    cfg = _cfg(tiny_model_dir, corpus_dir, "evaluate.prompts=2", "evaluate.prompt_tokens=16",
               "evaluate.new_tokens=8", "evaluate.draft_lens=[2,3]",
               "evaluate.draft_vocab=64")
    inputs = {"eval_cache": keys["eval"], "heads": keys["heads"], "gates": keys["gates"],
              "calibration": keys["calibration"], "teacher_topk": keys["teacher_topk"]}
    key = _run(EvaluateStage(), cfg, store, **inputs)
    m = store.manifest("evaluate", key)
    assert m.inputs == inputs
    metrics = m.metrics
    assert set(metrics["heads"]) == set(metrics["lens"]) == {"1", "2", "3"}
    for h in metrics["heads"].values():
        assert {"agreement", "top5_agreement", "accuracy", "perplexity", "kl_from_teacher", "ece"} <= set(h)
        assert h["top5_agreement"] >= h["agreement"]
    assert len(metrics["guarantees"]) == 2 * 3 * 2  # predictor x head x level
    assert all(0 <= c["compute_saved"] <= 1 for c in metrics["cascade"])
    assert set(metrics["gates"]) == {"1", "2", "3"}
    decode = metrics["decode"]
    assert all(s["identical"] for s in decode["settings"]) and decode["settings"]
    assert {s["exit_layer"] for s in decode["settings"]} == {1, 2}  # heads in the lower half of the 4 layers
    assert any(s["vocab_size"] == 64 for s in decode["settings"])
    assert _run(EvaluateStage(), cfg, store, **inputs) == key  # a hit
    from reports.evaluation import evaluation_summary

    summary = evaluation_summary(metrics)
    assert "cascade, layer compute saved" in summary and "guarantees held" in summary and "decoding:" in summary

    # bad input is refused at planning, before any work
    other = _cfg(tiny_model_dir, corpus_dir, "heads.lr=0.002")
    other_heads = _run(TrainHeadsStage(), other, store, cache=keys["train"], teacher_topk=keys["teacher_topk"])
    with pytest.raises(InputMismatch, match="fitted on heads"):
        _plan(EvaluateStage(), cfg, store, **{**inputs, "heads": other_heads})
    with pytest.raises(InputMismatch, match=r"exit_layers \[7\] have no head"):
        _plan(EvaluateStage(), _cfg(tiny_model_dir, corpus_dir, "evaluate.exit_layers=[7]"), store, **inputs)
    with pytest.raises(InputMismatch, match=r"draft_level=0.7 is not a calibrated level \(\[0.5, 0.8\]\)"):
        _plan(EvaluateStage(), _cfg(tiny_model_dir, corpus_dir, "evaluate.draft_level=0.7"), store, **inputs)
    assert m.extra["draft_level"] == 0.8  # the calibrated level nearest 0.9
    with pytest.raises(Exception, match="draft_lens"):
        _cfg(tiny_model_dir, corpus_dir, "evaluate.draft_lens=[0]")
    too_long = _cfg(tiny_model_dir, corpus_dir, "evaluate.prompt_tokens=100000")
    with pytest.raises(ValueError, match="100000"):
        _run(EvaluateStage(), too_long, store, **inputs)


@pytest.mark.parametrize("kind", ["adapter", "linear"])
def test_quantize_retrains_packs_calibrates_and_evaluates_ternary_heads(kind, trained, tiny_model_dir, corpus_dir):
    from flows.stages.evaluate import EvaluateStage
    import torch

    from flows.stages.quantize import HEADS_PACKED, QuantizeStage, load_quantized
    from pipeline.ternary import BitLinear
    from stores.files import load_tensors

    _, store, keys = trained
    cfg = _cfg(tiny_model_dir, corpus_dir, f"heads.kind={kind}", "quantize.epochs=1", "quantize.batch_tokens=256",
               "quantize.warmup_steps=2", "evaluate.decode=false")
    heads = keys["heads"]
    gates = keys["gates"]
    if kind == "linear":
        heads = _run(TrainHeadsStage(), cfg, store, cache=keys["train"], teacher_topk=keys["teacher_topk"])
        gates = None
    q = _run(QuantizeStage(), cfg, store, cache=keys["train"], heads=heads, gates=gates,
             teacher_topk=keys["teacher_topk"], eval_cache=keys["eval"])
    m = store.manifest("quantize", q)
    assert m.inputs["heads"] == heads and ("gates" in m.inputs) == (gates is not None)
    assert set(m.metrics["eval"]) == {"1", "2", "3"} and m.metrics["epochs"]
    size = m.metrics["size"]
    if kind == "linear":  # the V x H projection is what ternary packing shrinks
        assert all(s["ratio"] > 8 for s in size.values()), size
    for layer, check in m.metrics["packed"].items():  # what a deployment loads computes what was trained
        assert check["top1_equal"] >= 0.99 and check["max_rel_diff"] < 1e-3, (layer, check)
        assert check["ms_per_token"]["batch_64"]["packed"] > 0
    packed = load_tensors(store.path("quantize", q) / HEADS_PACKED)
    assert all(t.dtype == torch.uint8 for name, t in packed.items() if name.endswith("packed")), sorted(packed)

    teacher = load_teacher(store, keys["train"])
    ternary, ternary_gates, _ = load_quantized(store, q, teacher)
    weights = [mod for mod in ternary.modules() if isinstance(mod, BitLinear)]
    assert weights and (ternary_gates is not None) == (gates is not None)

    # the ternary heads are calibrated and evaluated by the same stages as the float ones
    cal = _run(CalibrateStage(), cfg, store, calib_cache=keys["calib"], quantized=q, eval_cache=keys["eval"])
    assert store.manifest("calibrate", cal).inputs == {"calib_cache": keys["calib"], "quantized": q,
                                                       "eval_cache": keys["eval"]}
    ev = _run(EvaluateStage(), cfg, store, eval_cache=keys["eval"], quantized=q, calibration=cal)
    assert set(store.manifest("evaluate", ev).metrics["heads"]) == {"1", "2", "3"}
    with pytest.raises(InputMismatch, match="fitted on"):  # a float calibration for ternary heads
        _plan(EvaluateStage(), cfg, store, eval_cache=keys["eval"], quantized=q, calibration=keys["calibration"])


def test_quantize_refuses_negative_lambdas_and_foreign_heads(trained, tmp_path, make_tiny_model, corpus_dir,
                                                            tiny_model_dir):
    from flows.stages.quantize import QuantizeStage
    from pipeline.config import ConfigError

    _, store, keys = trained
    with pytest.raises(ConfigError, match=r"quantize.quant_weight = -1"):
        _cfg(tiny_model_dir, corpus_dir, "quantize.quant_weight=-1")
    other = make_tiny_model(tmp_path / "other", seed=1)
    other_cfg = _cfg(other, corpus_dir)
    other_train = _run(ExtractStage("train"), other_cfg, store)
    with pytest.raises(InputMismatch, match="another backbone"):
        _plan(QuantizeStage(), other_cfg, store, cache=other_train, heads=keys["heads"],
              teacher_topk=keys["teacher_topk"])
