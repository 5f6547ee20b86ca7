"""The flows under a real (ephemeral, SQLite) Prefect server: task caching on content keys,
refresh when an artifact was deleted, and the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]




def _overrides(model, corpus):
    return [f"model.source={model}", f"data.source={corpus}", "data.seq_len=32", "extract.layers=[1,2]",
            "extract.max_tokens=2048", "extract.chunk_tokens=256",
            "data.fractions={train: 0.6, calib: 0.2, eval: 0.2}"]


def _task_states(flow_run_id) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    import anyio

    async def fetch():
        async with get_client() as client:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            return {r.name: r.state.name for r in runs}

    return anyio.run(fetch)


def _artifacts(flow_run_id) -> list:
    import anyio
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def fetch():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))

    return anyio.run(fetch)


def test_extract_flow_caches_on_content_key_and_refreshes(prefect_env, tmp_path, tiny_model_dir, corpus_dir):
    from flows.dag import extract_flow
    from stores.artifacts import ArtifactStore

    root = str(tmp_path / "root")
    ov = _overrides(tiny_model_dir, corpus_dir)
    first = extract_flow(overrides=ov, root=root, return_state=True)
    keys = first.result()
    key = keys["train_cache"]
    assert set(keys) == {"train_cache", "report"}  # every flow ends with its report
    second = extract_flow(overrides=ov, root=root, return_state=True)
    assert second.result() == keys
    states = _task_states(second.state_details.flow_run_id)
    assert sorted(states.values()) == ["Cached", "Cached"], states
    results = list((Path(root) / "task-results").iterdir())
    assert results and all(json.loads(p.read_text())["metadata"]["serializer"]["type"] == "json" for p in results)
    # the artifact is gone: the cached Prefect result must not hide that
    store = ArtifactStore(root)
    shutil.rmtree(store.path("extract", key))
    third = extract_flow(overrides=ov, root=root, return_state=True)
    assert third.result() == keys and store.exists("extract", key)
    states = _task_states(third.state_details.flow_run_id)
    assert states[f"extract-train-{key[:12]}"] == "Completed" and states[f"report-{keys['report'][:12]}"] == "Cached"
    # a changed input is a new key and a new run
    other = extract_flow(overrides=ov + ["extract.layers=[1,3]"], root=root)
    assert other["train_cache"] != key


def test_teacher_topk_is_a_task_of_its_own(prefect_env, tmp_path, tiny_model_dir, corpus_dir):
    from flows.dag import teacher_topk_flow

    root = str(tmp_path / "root")
    state = teacher_topk_flow(overrides=_overrides(tiny_model_dir, corpus_dir), root=root, return_state=True)
    keys = state.result()
    names = sorted(_task_states(state.state_details.flow_run_id))
    assert names == sorted([f"extract-train-{keys['train_cache'][:12]}", f"teacher_topk-{keys['teacher_topk'][:12]}",
                            f"report-{keys['report'][:12]}"])
    # what the run page shows: each stage's summary and table, progress, the report's link and summary
    arts = _artifacts(state.state_details.flow_run_id)
    by_key = {a.key: a for a in arts if a.key}
    assert {"extract-summary", "extract-table", "teacher-topk-summary", "teacher-topk-table", "report",
            "report-summary"} <= set(by_key)
    from reports.index import report_html_path
    from stores.artifacts import ArtifactStore

    report = report_html_path(ArtifactStore(root), keys["report"])
    assert report.is_file() and report.resolve().as_uri() in by_key["report"].data
    tokens = ArtifactStore(root).manifest("extract", keys["train_cache"]).metrics["tokens"]
    assert f"{tokens:,}" in by_key["extract-summary"].data or str(tokens) in by_key["extract-summary"].data
    progress = [a for a in arts if a.type == "progress"]
    assert progress and all(float(a.data) == 100.0 for a in progress), [(a.description, a.data) for a in progress]
    assert any("extract" in (a.description or "") for a in progress)


def test_cli_run_ls_show(prefect_env, tmp_path, tiny_model_dir, corpus_dir):
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_SERVER_ANALYTICS_ENABLED", "DO_NOT_TRACK")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    exe = [sys.executable, "-m", "flows.cli", "--root", str(tmp_path / "root")]
    sets = [a for o in _overrides(tiny_model_dir, corpus_dir) for a in ("--set", o)]
    run = subprocess.run(exe + ["run", "extract", *sets], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    key = next(line.split()[1] for line in run.stdout.splitlines() if line.startswith("train_cache"))
    assert "path:" in run.stdout
    assert "telemetry" not in (run.stdout + run.stderr).lower()  # offline: the CLI turns it off itself
    report = run.stdout.strip().splitlines()[-1]
    assert report.startswith("report: ") and report.endswith("report.html") and Path(report[8:]).is_file()
    latest = subprocess.run(exe + ["report"], env=env, capture_output=True, text=True, check=True)
    assert latest.stdout.strip() == report[8:]
    ls = subprocess.run(exe + ["ls"], env=env, capture_output=True, text=True, check=True)
    assert key[:16] in ls.stdout and "extract" in ls.stdout and "STAGE" in ls.stdout
    show = subprocess.run(exe + ["show", key[:8]], env=env, capture_output=True, text=True, check=True)
    assert f'"key": "{key}"' in show.stdout and '"layers"' in show.stdout
    bad = subprocess.run(exe + ["run", "extract", "--set", "extract.layers=[0]", "--set", "data.seq_len=0"],
                         env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "2 problems" in bad.stderr and "Traceback" not in bad.stderr
    missing = subprocess.run(exe + ["run", "extract", "--set", "model.source=/no/model"], env=env, capture_output=True, text=True)
    assert missing.returncode == 2
    assert any(line.startswith("error: model path '/no/model' does not exist") for line in missing.stderr.splitlines())
