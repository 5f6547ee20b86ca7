"""`make serve` / `make stop` (flows/serve.py): a real Prefect server, the work pool, every
deployment of prefect.yaml, a worker and the report server on a temporary artifact root; stop
ends every process it recorded."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import psutil
import pytest
import yaml

from flows import serve

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`serve.start` on a temporary root and free ports; stopped whatever the tests do."""
    root = tmp_path_factory.mktemp("serve-root")
    t0 = time.monotonic()
    try:
        state = serve.start(root, port=_free_port(), report_port=_free_port(), timeout=120)
        yield root, state, time.monotonic() - t0
    finally:
        serve.stop(root, quiet=True)


def test_serve_runs_the_ui_the_deployments_a_worker_and_the_reports(served):
    import httpx

    root, state, seconds = served
    assert seconds < 120
    assert json.loads((root / "serve.json").read_text())["api_url"] == state.api_url
    assert {p.name for p in state.processes} == {"server", "worker", "reports"}
    assert serve.running_api_url(root) == state.api_url == f"http://127.0.0.1:{state.port}/api"

    assert httpx.get(state.ui_url, timeout=10).status_code == 200  # the UI's page
    api = httpx.Client(base_url=state.api_url, timeout=30)
    pool = api.get(f"/work_pools/{serve.POOL}").raise_for_status().json()
    assert pool["type"] == "process"
    expected = {d["name"] for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}
    deployed = {d["name"]: d for d in api.post("/deployments/filter", json={}).raise_for_status().json()}
    assert set(deployed) == expected
    assert all(d["work_pool_name"] == serve.POOL for d in deployed.values())

    (worker,) = [p for p in state.processes if p.name == "worker"]
    assert psutil.Process(worker.pid).is_running()
    workers = api.post(f"/work_pools/{serve.POOL}/workers/filter", json={}).raise_for_status().json()
    assert any(w["status"] == "ONLINE" for w in workers)
    env = psutil.Process(worker.pid).environ()  # runs write to this root and link its reports
    assert env["EXITFLOW_HOME"] == str(root) and env["EXITFLOW_REPO"] == str(REPO)
    assert env["EXITFLOW_REPORT_URL"] == state.reports_url
    assert env["PREFECT_API_URL"] == state.api_url and env["PREFECT_HOME"] == str(root / "prefect")

    (root / "artifacts" / "report" / "k").mkdir(parents=True)
    (root / "artifacts" / "report" / "k" / "report.html").write_text("<p>42</p>")
    assert httpx.get(f"{state.reports_url}/artifacts/report/k/report.html", timeout=10).text == "<p>42</p>"

    assert (root / "prefect").is_dir()  # the server's database lives under the artifact root
    server_log = Path(next(p.log for p in state.processes if p.name == "server")).read_text()
    assert "telemetry" not in server_log.lower()


def test_a_second_start_reuses_the_running_one(served, capsys):
    root, state, _ = served
    again = serve.start(root, port=_free_port(), report_port=_free_port())
    assert [p.pid for p in again.processes] == [p.pid for p in state.processes]
    assert "already running" in capsys.readouterr().out


def test_exitflow_run_uses_the_served_server_instead_of_a_temporary_one(served, tiny_model_dir, corpus_dir):
    import os
    import subprocess
    import sys

    import httpx

    root, state, _ = served
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "EXITFLOW_REPORT"))}
    sets = [f"model.source={tiny_model_dir}", f"data.source={corpus_dir}", "data.seq_len=32", "extract.layers=[1,2]",
            "extract.max_tokens=1024", "extract.chunk_tokens=256"]
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "--root", str(root), "run", "extract",
                           *[a for s in sets for a in ("--set", s)]],
                          env={**env, "OMP_NUM_THREADS": "1"}, cwd=REPO, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert f"using the Prefect server at {state.api_url}" in out
    assert "temporary server" not in out
    api = httpx.Client(base_url=state.api_url, timeout=30)
    runs = api.post("/flow_runs/filter", json={}).raise_for_status().json()
    assert any(r["state_type"] == "COMPLETED" for r in runs)  # the run is in the served UI
    links = [a for a in api.post("/artifacts/filter", json={}).raise_for_status().json() if a["key"] == "report"]
    url = links[0]["data"].split("](", 1)[1].rstrip(")")  # stored as markdown: [text](url)
    assert url.startswith(f"{state.reports_url}/artifacts/report/") and url.endswith("/report.html")
    assert httpx.get(url, timeout=10).status_code == 200  # the link opens


def test_a_port_in_use_is_named_with_the_fix(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(serve.ServeError, match=rf"port {port} .*in use.*PORT=\d+ make serve"):
            serve.start(tmp_path, port=port, report_port=_free_port())
    assert not (tmp_path / "serve.json").exists()


@pytest.mark.parametrize("root", ["s3://bucket/exitflow", None])
def test_a_url_root_is_refused_naming_it_and_the_fix(tmp_path, monkeypatch, root):
    """serve's database and reports live in a folder: a URL root (given or from EXITFLOW_HOME)
    is one error, before anything starts or any folder named like the URL appears."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EXITFLOW_HOME", "memory://exitflow-serve")
    with pytest.raises(serve.ServeError, match=r"is a URL; give --root a folder"):
        serve.start(root, port=_free_port(), report_port=_free_port())
    assert not any(tmp_path.iterdir())


def test_stop_ends_every_recorded_process(served, capsys):
    root, state, _ = served
    pids = [p.pid for p in state.processes]
    assert serve.stop(root) == ["reports", "worker", "server"]
    assert all(_gone(pid) for pid in pids)
    assert not (root / "serve.json").exists()
    assert serve.running_api_url(root) is None
    assert not serve._port_in_use("127.0.0.1", state.port)
    capsys.readouterr()
    assert serve.stop(root) == []
    assert "nothing to stop" in capsys.readouterr().out


def test_stop_with_a_stale_record_touches_nothing_else(tmp_path, capsys):
    """A recorded pid that another program got since (here: this test's own) is left alone."""
    me = psutil.Process()
    stale = serve.Served(root=str(tmp_path), repo=str(REPO), host="127.0.0.1", port=1, report_port=2,
                         ui_url="http://127.0.0.1:1", api_url="http://127.0.0.1:1/api", reports_url="",
                         reports_index_url="", logs="", started="",
                         processes=[serve.ServedProcess("server", me.pid, me.create_time() - 1000, "", [])])
    (tmp_path / "serve.json").write_text(json.dumps(serve.asdict(stale)))
    assert serve.running_api_url(tmp_path) is None
    assert serve.stop(tmp_path) == []
    assert "nothing was running" in capsys.readouterr().out
    assert not (tmp_path / "serve.json").exists()
