"""prefect.yaml: every deployment names a real flow with parameters it accepts, recalibration is
scheduled nightly; and (slow) `prefect deploy --all` against a real server, then a worker runs
deployments from outside the repo through the pull step."""

from __future__ import annotations

import importlib
import inspect
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PREFECT = [sys.executable, "-m", "prefect"]
POOL = "exitflow-process"
EXPECTED = {  # deployment -> flow function
    "recalibrate": "flows.recalibrate.recalibrate_flow",
    "pipeline": "flows.dag.pipeline_flow",
    "extract": "flows.dag.extract_flow",
    "teacher_topk": "flows.dag.teacher_topk_flow",
    "train_heads": "flows.dag.train_heads_flow",
    "train_gates": "flows.dag.train_gates_flow",
    "calibrate": "flows.dag.calibrate_flow",
    "quantize": "flows.dag.quantize_flow",
    "evaluate": "flows.dag.evaluate_flow",
}


@pytest.fixture(scope="module")
def spec() -> dict:
    return yaml.safe_load((REPO / "prefect.yaml").read_text())


def _deployments(spec) -> dict[str, dict]:
    return {d["name"]: d for d in spec["deployments"]}


def _import_flow(entrypoint: str):
    if ":" in entrypoint:
        raise AssertionError(f"{entrypoint}: use a module path; a file entrypoint under flows/ loads with flows/ first "
                             "on sys.path, where flows/dag.py shadows the flows package")
    module, name = entrypoint.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def test_every_flow_is_deployed_to_the_process_pool(spec):
    from prefect import Flow

    deps = _deployments(spec)
    assert spec["name"] == "exitflow"
    assert {n: d["entrypoint"] for n, d in deps.items()} == EXPECTED
    for name, d in deps.items():
        assert isinstance(_import_flow(d["entrypoint"]), Flow), name
        assert d["work_pool"]["name"] == POOL, name
    assert spec["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $EXITFLOW_REPO }}"}}]


def test_every_deployment_is_named_after_its_flow(spec):
    """`prefect deployment run extract/extract`, `train_heads/train_heads`: one name to learn."""
    for name, d in _deployments(spec).items():
        assert _import_flow(d["entrypoint"]).name == name, d["entrypoint"]


def test_recalibration_runs_nightly_and_the_rest_on_demand(spec):
    from prefect.client.schemas.schedules import CronSchedule

    deps = _deployments(spec)
    (nightly,) = deps["recalibrate"]["schedules"]
    assert nightly == {"cron": "0 2 * * *", "timezone": "UTC", "active": True}
    CronSchedule(cron=nightly["cron"], timezone=nightly["timezone"])  # valid for Prefect
    assert deps["recalibrate"]["parameters"] == {"data_source": "./data/incoming"}
    assert all(d["schedules"] == [] for n, d in deps.items() if n != "recalibrate")


def test_parameters_match_the_flow_signatures(spec):
    for name, d in _deployments(spec).items():
        params = inspect.signature(_import_flow(d["entrypoint"]).fn).parameters
        given = d.get("parameters") or {}
        assert set(given) <= set(params), f"{name}: {sorted(set(given) - set(params))} are not parameters of the flow"
        required = {p for p, v in params.items() if v.default is inspect.Parameter.empty}
        assert required <= set(given), f"{name}: {sorted(required - set(given))} have no value"
        if "config_path" in given:
            assert (REPO / given["config_path"]).is_file(), name


def test_prefect_loads_every_entrypoint_in_a_fresh_process(spec):
    """The worker's loader, in a clean interpreter from the repo root (no test imports)."""
    eps = [d["entrypoint"] for d in spec["deployments"]]
    code = ("import sys; from prefect.flows import load_flow_from_entrypoint\n"
            "for ep in sys.argv[1:]: print(ep, load_flow_from_entrypoint(ep, use_placeholder_flow=False).name)")
    out = subprocess.run([sys.executable, "-c", code, *eps], check=False, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(out.stdout.splitlines()) == len(eps)


# -- the real thing --------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`prefect server start` on SQLite under a temporary PREFECT_HOME; stopped whatever happens."""
    import httpx

    home = tmp_path_factory.mktemp("prefect-server-home")
    url = f"http://127.0.0.1:{_free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_API_URL=f"{url}/api", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_CLI_PROMPT="false", OMP_NUM_THREADS="1")
    log = open(home / "server.log", "w")  # noqa: SIM115 (closed in the finally below)
    proc = subprocess.Popen([*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1],
                             "--analytics-off"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prefect server did not come up: {(home / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield env, httpx.Client(base_url=f"{url}/api", timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and what it started
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


@pytest.fixture(scope="module")
def deployed(server):
    env, api = server
    for cmd in (["work-pool", "create", POOL, "--type", "process"], ["--no-prompt", "deploy", "--all"]):
        run = subprocess.run([*PREFECT, *cmd], check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, f"prefect {' '.join(cmd)}:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    deps = api.post("/deployments/filter", json={}).raise_for_status().json()
    return env, api, {d["name"]: d for d in deps}


def _flow_runs(api, **flt) -> list[dict]:
    return api.post("/flow_runs/filter", json={"flow_runs": flt}).raise_for_status().json()


@pytest.mark.slow
def test_deploy_all_creates_an_active_nightly_schedule(deployed):
    _, api, deps = deployed
    assert set(deps) == set(EXPECTED)
    nightly = deps["recalibrate"]
    assert not nightly["paused"] and nightly["work_pool_name"] == POOL
    (sched,) = nightly["schedules"]
    assert sched["active"] and sched["schedule"]["cron"] == "0 2 * * *" and sched["schedule"]["timezone"] == "UTC"
    assert nightly["parameters"] == {"data_source": "./data/incoming"}
    assert set(nightly["parameter_openapi_schema"]["properties"]) == {
        "data_source", "inputs", "model", "data", "extract", "calibrate", "config_path", "overrides", "root"}
    # the repo location is the worker's, read when a run starts, not baked in at deploy time
    assert nightly["pull_steps"] == [{"prefect.deployments.steps.set_working_directory":
                                      {"directory": "{{ $EXITFLOW_REPO }}"}}]
    assert all(d["schedules"] == [] for n, d in deps.items() if n != "recalibrate")
    # the scheduler turns the cron into runs at 02:00 UTC
    deadline, runs = time.monotonic() + 90, []
    while not runs and time.monotonic() < deadline:
        runs = _flow_runs(api, deployment_id={"any_": [nightly["id"]]})
        time.sleep(1)
    assert runs and all(r["state_type"] == "SCHEDULED" and r["expected_start_time"][11:19] == "02:00:00" for r in runs)


@pytest.mark.slow
def test_a_worker_runs_deployments_from_the_repo(deployed, tmp_path, tiny_model_dir, corpus_dir):
    """Runs started from the API: the worker sits outside the repo, the pull step moves each run
    into it (the relative config path resolves there), and the module entrypoints load."""
    env, api, deps = deployed
    ov = [f"model.source={tiny_model_dir}", f"data.source={corpus_dir}", "data.seq_len=32", "extract.layers=[1,2]",
          "extract.max_tokens=1024", "extract.chunk_tokens=256"]
    root = tmp_path / "root"

    def start(deployment: str, **parameters) -> str:
        run = api.post(f"/deployments/{deps[deployment]['id']}/create_flow_run",
                       json={"parameters": {"config_path": "configs/quick.yaml", "overrides": ov, **parameters}})
        return run.raise_for_status().json()["id"]

    extract = start("extract", root=str(root))
    recal = start("recalibrate", root=str(tmp_path / "empty"), data_source=str(corpus_dir))
    worker = subprocess.run([*PREFECT, "worker", "start", "--pool", POOL, "--run-once"], check=False, cwd=tmp_path,
                            env={**env, "EXITFLOW_REPO": str(REPO)}, capture_output=True, text=True, timeout=400)
    assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]
    states = {r["id"]: r for r in _flow_runs(api, id={"any_": [extract, recal]})}
    assert states[extract]["state_type"] == "COMPLETED", worker.stdout[-3000:]
    assert len(list((root / "artifacts" / "extract").glob("*/manifest.json"))) == 1
    # recalibration loaded and ran: on an empty root (the first nightly run) it completes and says why
    assert states[recal]["state_type"] == "COMPLETED", worker.stdout[-3000:]
    assert "nothing to recalibrate" in worker.stdout + worker.stderr
