"""train_heads -> train_gates -> calibrate wired through the stores, on the tiny model."""

from __future__ import annotations

import json

import pytest

from flows import stages
from pipeline.config import load_config
from stores.artifacts import ArtifactStore


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
    keys = {s: stages.run_extract(cfg, store, s, progress=False) for s in ("train", "calib", "eval")}
    keys["heads"] = stages.run_train_heads(cfg, store, keys["train"], keys["eval"], progress=False)
    keys["gates"] = stages.run_train_gates(cfg, store, keys["train"], keys["heads"], keys["eval"], progress=False)
    keys["calibration"] = stages.run_calibrate(cfg, store, keys["calib"], keys["heads"], keys["gates"], keys["eval"])
    return cfg, store, keys


def test_artifacts_carry_metrics_and_inputs(trained):
    cfg, store, keys = trained
    heads = store.manifest("train_heads", keys["heads"])
    assert heads.inputs == {"cache": keys["train"], "eval_cache": keys["eval"]}
    assert set(heads.metrics["eval"]) == set(heads.metrics["logit_lens"]) == {"1", "2", "3"}
    assert heads.metrics["epochs"] and heads.metrics["tokens_per_s"] > 0
    assert (store.path("train_heads", keys["heads"]) / "heads.safetensors").is_file()
    assert not (store.path("train_heads", keys["heads"]) / "checkpoints").exists()
    gates = store.manifest("train_gates", keys["gates"])
    assert set(gates.metrics["eval"]) == {"1", "2", "3"}
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


def test_same_inputs_are_a_hit_and_a_change_reruns_only_downstream(trained):
    cfg, store, keys = trained
    assert stages.run_train_heads(cfg, store, keys["train"], keys["eval"], progress=False) == keys["heads"]
    changed = cfg.model_copy(update={"gates": cfg.gates.model_copy(update={"lr": 2e-3})})
    assert stages.plan_train_heads(changed, store, keys["train"], keys["eval"]).key == keys["heads"]
    assert stages.plan_train_gates(changed, store, keys["train"], keys["heads"], keys["eval"]).key != keys["gates"]


def test_wrong_inputs_are_refused(trained, tmp_path, tiny_model_dir, corpus_dir, make_tiny_model):
    cfg, store, keys = trained
    with pytest.raises(stages.InputMismatch, match="not in the cache"):
        stages.plan_train_heads(_cfg(tiny_model_dir, corpus_dir, "heads.layers=[2,5]"), store, keys["train"], None)
    # a cache of another backbone named explicitly
    other = make_tiny_model(tmp_path / "other", seed=1)
    other_cfg = _cfg(other, corpus_dir, f"inputs.train_cache={keys['train'][:10]}")
    with pytest.raises(stages.InputMismatch, match="another|extracted from backbone"):
        stages.resolve_cache(other_cfg, store, "train")


def test_too_few_calib_tokens_for_the_guarantee(trained):
    from pipeline.calibrate import CalibrationError

    cfg, store, keys = trained
    strict = cfg.model_copy(update={"calibrate": cfg.calibrate.model_copy(update={"levels": [0.999], "delta": 0.01})})
    with pytest.raises(CalibrationError, match=r"\d{4}"):
        stages.run_calibrate(strict, store, keys["calib"], keys["heads"], keys["gates"], None)


def test_efficient_loss_uses_a_shared_teacher_topk_artifact(trained, tiny_model_dir, corpus_dir):
    _, store, keys = trained
    cfg = _cfg(tiny_model_dir, corpus_dir, "heads.efficient_loss=true")
    heads = stages.run_train_heads(cfg, store, keys["train"], keys["eval"], progress=False)
    assert heads != keys["heads"]
    topk = [m for m in store.iter_manifests("teacher_topk")]
    assert len(topk) == 1 and topk[0].inputs == {"cache": keys["train"]} and topk[0].config == {"k": 16}
    # a second efficient run with another learning rate reuses the same top-k
    cfg2 = _cfg(tiny_model_dir, corpus_dir, "heads.efficient_loss=true", "heads.lr=0.002")
    stages.run_train_heads(cfg2, store, keys["train"], None, progress=False)
    assert len(list(store.iter_manifests("teacher_topk"))) == 1
    m = store.manifest("train_heads", heads)
    assert m.metrics["eval"]["3"]["agreement"] > 0


def test_online_heads_need_no_train_cache_and_match_offline_quality(trained, tiny_model_dir, corpus_dir):
    _, store, keys = trained
    cfg = _cfg(tiny_model_dir, corpus_dir, "heads.mode=online")
    key = stages.run_train_heads_online(cfg, store, keys["eval"], progress=False)
    m = store.manifest("train_heads", key)
    assert "cache" not in m.inputs and m.inputs["eval_cache"] == keys["eval"]
    assert key == stages.run_train_heads_online(cfg, store, keys["eval"], progress=False)  # a hit
    offline = store.manifest("train_heads", keys["heads"]).metrics["eval"]
    for layer in ("1", "2", "3"):
        assert abs(m.metrics["eval"][layer]["agreement"] - offline[layer]["agreement"]) < 0.05
    # online heads calibrate like offline ones
    cal = stages.run_calibrate(cfg, store, keys["calib"], key, None, keys["eval"])
    assert store.exists("calibrate", cal)
