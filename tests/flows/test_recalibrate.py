"""Scheduled recalibration under a real (ephemeral) Prefect server, on the tiny model: unchanged
data is a cache hit, new documents give a new calibration that is promoted exactly when no
checked threshold fails under the family-wise rule, a failing check keeps the current
calibration and says which one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.recalibrate import deployed_thresholds

NEW_DOCUMENTS = range(30, 40)  # of sorted(pydoc_data.topics): three land in calib, two in eval
LEVELS = [0.5, 0.8]
LAYERS = [1, 2, 3]




def _overrides(model_dir) -> list[str]:
    # max_tokens covers the whole calib split, so added documents really enter its cache
    return [f"model.source={model_dir}", "data.seq_len=32", "data.fractions={train: 0.5, calib: 0.3, eval: 0.2}",
            "extract.layers=[1,2,3]", "extract.chunk_tokens=256", "extract.max_tokens=8192",
            "heads.epochs=1", "heads.batch_tokens=512", "heads.warmup_steps=2", "heads.negatives=64", "heads.topk=16",
            "gates.epochs=1", "gates.batch_tokens=512", "gates.warmup_steps=2", "calibrate.levels=[0.5, 0.8]"]


@pytest.fixture(scope="module")
def deployed(prefect_env, tmp_path_factory, tiny_model_dir, corpus_dir):
    """The whole pipeline once on a folder of documents: `current` points at its calibration."""
    from flows.dag import pipeline_flow

    base = tmp_path_factory.mktemp("deployed")
    data = base / "incoming"
    shutil.copytree(corpus_dir, data)
    ov = _overrides(tiny_model_dir)
    keys = pipeline_flow(overrides=[*ov, f"data.source={data}"], root=str(base / "root"))
    return base, ov, keys


@pytest.fixture
def site(deployed, tmp_path):
    """A private copy of the deployed root and data folder, so tests do not see each other's pointers."""
    base, ov, keys = deployed
    shutil.copytree(base / "root", tmp_path / "root")
    shutil.copytree(base / "incoming", tmp_path / "incoming")
    return tmp_path / "root", tmp_path / "incoming", ov, keys


def _task_states(flow_run_id) -> list[tuple[str, str]]:
    import anyio
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def fetch():
        async with get_client() as client:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            return sorted((r.name, r.state.name) for r in runs)

    return anyio.run(fetch)


def _ui_artifacts(flow_run_id) -> dict[str, object]:
    import anyio
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def fetch():
        async with get_client() as client:
            arts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
            return {a.key: a for a in arts}

    return anyio.run(fetch)


def _count_artifacts(root: Path) -> int:
    return sum(1 for _ in (root / "artifacts").glob("*/*/manifest.json"))


def _recalibrate(root, data, ov, **kw):
    from flows.recalibrate import recalibrate_flow

    state = recalibrate_flow(overrides=ov, root=str(root), data_source=str(data), return_state=True, **kw)
    return state.result(), state.state_details.flow_run_id


def _add_documents(folder: Path) -> None:
    from pydoc_data.topics import topics

    names = sorted(topics)
    for i in NEW_DOCUMENTS:
        (folder / f"doc{i:03d}.txt").write_text(topics[names[i]])


def test_unchanged_data_is_a_cache_hit(site):
    from stores.artifacts import ArtifactStore

    root, data, ov, keys = site
    store = ArtifactStore(root)
    assert store.get_pointer("current")["key"] == keys["calibration"]
    before = _count_artifacts(root)
    out, run_id = _recalibrate(root, data, ov)
    assert out["calibration"] == out["previous"] == keys["calibration"]
    assert out["promoted"] is False and out["recalibrate"] is None
    assert "unchanged" in out["reason"] and "cache hit" in out["reason"]
    states = _task_states(run_id)
    assert [s for _, s in states] == ["Cached"] * 3, states  # extract calib, extract eval, calibrate
    assert _count_artifacts(root) == before
    assert store.get_pointer("current")["key"] == keys["calibration"]
    assert set(_ui_artifacts(run_id)) == {"recalibration-decision"}  # says so in the UI; no drift to show


def test_new_documents_promote_iff_held_out_checks_are_met(site):
    from stores.artifacts import ArtifactStore

    root, data, ov, keys = site
    store = ArtifactStore(root)
    _add_documents(data)
    out, run_id = _recalibrate(root, data, ov)

    new = store.manifest("calibrate", out["calibration"])
    assert out["previous"] == keys["calibration"] != out["calibration"]
    assert new.inputs["calib_cache"] != keys["calib_cache"] and new.inputs["eval_cache"] != keys["eval_cache"]
    assert new.inputs["heads"] == keys["heads"] and new.inputs["gates"] == keys["gates"]  # the deployed heads
    old_calib = store.manifest("extract", keys["calib_cache"])
    new_calib = store.manifest("extract", new.inputs["calib_cache"])
    assert new_calib.extra["num_documents"] > old_calib.extra["num_documents"]
    assert new_calib.metrics["tokens"] > old_calib.metrics["tokens"]  # the new documents are in the cache

    folder = store.path("recalibrate", out["recalibrate"])
    drift = json.loads((folder / "drift.json").read_text())
    rows = {(r["predictor"], r["head"], r["level"]): r for r in drift["drift"]}
    assert set(rows) == {(p, h, lv) for p in ("entropy", "gate") for h in LAYERS for lv in LEVELS}
    for r in rows.values():
        for k in ("shift", "exit_rate_change", "accuracy_change", "held_out_met", "held_out_held"):
            assert k in r
        assert r["old_exit_rate"] is not None and r["new_exit_rate"] is not None
    calibration = json.loads((store.path("calibrate", out["calibration"]) / "calibration.json").read_text())
    held = calibration["held_out"]
    assert len(held) == len(rows)
    # the family: certified thresholds (of the deployed predictor, when calibration.json names it), each at delta / K
    deployed = deployed_thresholds(calibration)
    family = [r for r in held if r["threshold"] is not None
              and (deployed is None or (r["predictor"], r["head"], r["level"]) in deployed)]
    rule = drift["rule"]
    assert rule["name"] == "bonferroni" and rule["delta"] == calibration["delta"] and rule["checked"] == len(family)
    assert rule["per_check_delta"] == pytest.approx(calibration["delta"] / max(len(family), 1))
    assert rule["scope"] == ("certified" if deployed is None else "deployed")
    all_met = all(r["p_below"] > rule["per_check_delta"] for r in family)
    assert out["promoted"] is all_met is drift["promote"]
    assert store.get_pointer("current")["key"] == (out["calibration"] if all_met else keys["calibration"])
    assert ("promoted" in out["reason"]) is all_met
    md = (folder / "drift.md").read_text()
    assert "| entropy | 1 | 0.5 |" in md and out["reason"] in md

    ui = _ui_artifacts(run_id)
    assert ui["recalibration-drift"].type == "table" and ui["recalibration-decision"].type == "markdown"
    table = json.loads(ui["recalibration-drift"].data)  # the server keeps a table as a JSON string
    assert {(r["predictor"], r["head"], r["level"]) for r in table} == set(rows)
    assert list(table[0])[:6] == ["predictor", "head", "level", "old_threshold", "new_threshold", "shift"]

    # the same data again: unchanged if it was promoted, else the same verdict from the cache
    again, run_id = _recalibrate(root, data, ov)
    assert again["calibration"] == out["calibration"] and again["promoted"] is False
    if all_met:
        assert "unchanged" in again["reason"]
    else:
        assert again["recalibrate"] == out["recalibrate"] and again["reason"] == out["reason"]
        assert dict(_task_states(run_id))[f"recalibrate-{out['recalibrate'][:12]}"] == "Cached"


def test_a_failed_held_out_check_keeps_the_current_calibration(site, monkeypatch):
    from dataclasses import replace

    import flows.stages.calibrate as calibrate
    from stores.artifacts import ArtifactStore

    root, data, ov, keys = site
    store = ArtifactStore(root)
    real = calibrate.check_held_out

    def head_2_misses_level_08(calibration, labels, gate_probs, predictor=None):
        return [replace(r, accuracy=0.61, met=False, held=False, p_below=1e-6)
                if (r.head, r.predictor, r.level) == (2, "entropy", 0.8) else r
                for r in real(calibration, labels, gate_probs, predictor)]

    monkeypatch.setattr(calibrate, "check_held_out", head_2_misses_level_08)
    out, _ = _recalibrate(root, data, [*ov, "calibrate.seed=1"])  # new thresholds on the same data
    assert out["calibration"] != keys["calibration"] and out["promoted"] is False
    assert "head 2 entropy level 0.8: held-out accuracy 0.6100 < target 0.8" in out["reason"], out["reason"]
    assert f"kept the current calibration {keys['calibration'][:12]}" in out["reason"]
    assert store.get_pointer("current")["key"] == keys["calibration"]
    drift = json.loads((store.path("recalibrate", out["recalibrate"]) / "drift.json").read_text())
    assert drift["promote"] is False and (2, "entropy", 0.8) in {(r["head"], r["predictor"], r["level"])
                                                                 for r in drift["failures"]}
    again, run_id = _recalibrate(root, data, [*ov, "calibrate.seed=1"])  # the same verdict, from the cache
    assert again == out
    assert dict(_task_states(run_id))[f"recalibrate-{out['recalibrate'][:12]}"] == "Cached"


def test_without_deployed_heads_it_completes_and_says_what_to_run(prefect_env, tmp_path, tiny_model_dir, corpus_dir):
    out, _ = _recalibrate(tmp_path / "root", corpus_dir, _overrides(tiny_model_dir))
    assert out["skipped"] is True and out["calibration"] is None and out["promoted"] is False
    assert "nothing to recalibrate" in out["reason"] and "run the pipeline first" in out["reason"]
    assert not (tmp_path / "root" / "artifacts").exists()  # nothing extracted for nothing to recalibrate


def test_a_missing_data_folder_completes_as_nothing_to_do(site):
    root, _, ov, keys = site
    out, _ = _recalibrate(root, "./no/such/incoming", ov)
    assert out["skipped"] is True and "data folder ./no/such/incoming does not exist" in out["reason"]
    from stores.artifacts import ArtifactStore

    assert ArtifactStore(root).get_pointer("current")["key"] == keys["calibration"]


def test_heads_named_in_the_config_bootstrap_the_first_current(site):
    from stores.artifacts import ArtifactStore

    root, data, ov, keys = site
    (root / "pointers" / "current.json").unlink()
    store = ArtifactStore(root)
    out, _ = _recalibrate(root, data, [*ov, f"inputs.heads={keys['heads'][:12]}", f"inputs.gates={keys['gates'][:12]}"])
    assert out["calibration"] == keys["calibration"] and out["previous"] is None
    drift = json.loads((store.path("recalibrate", out["recalibrate"]) / "drift.json").read_text())
    assert all(r["old_threshold"] is None for r in drift["drift"])
    assert out["promoted"] is drift["promote"]
    assert (store.get_pointer("current") or {}).get("key") == (keys["calibration"] if out["promoted"] else None)


def test_promotion_leaves_a_pointer_that_moved_meanwhile(tmp_path):
    from types import SimpleNamespace

    from flows.recalibrate import _Deployed, _promote
    from stores.artifacts import ArtifactStore

    store = ArtifactStore(tmp_path)
    a, b, c = "a" * 64, "b" * 64, "c" * 64
    deployed = _Deployed(heads="h" * 64, gates=None, previous=a, source="test")
    outcome = SimpleNamespace(promote=True, reason="all met", calibration=c)
    store.set_pointer("current", "calibrate", b)  # another run promoted b after this one read a
    promoted, reason = _promote(store, deployed, outcome, "r" * 64)
    assert not promoted and f"moved to {b[:12]}" in reason and store.get_pointer("current")["key"] == b
    store.set_pointer("current", "calibrate", a)
    assert _promote(store, deployed, outcome, "r" * 64) == (True, "all met")
    assert store.get_pointer("current").items() >= {"key": c, "previous": a, "recalibrate": "r" * 64}.items()
