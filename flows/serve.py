"""`make serve` / `make stop`: the Prefect UI with every exitflow deployment, a worker that runs
them on this machine, and the HTML reports, started and stopped with one command each.

``start`` launches three long-lived processes, each in its own session (a terminal's Ctrl-C
reaches none of them), with logs under ``<root>/logs``:

- ``prefect server start`` on SQLite under ``<root>/prefect`` (analytics off: offline, every
  server otherwise logs a telemetry error), then the ``exitflow-process`` work pool and
  ``prefect --no-prompt deploy --all`` from the repo's ``prefect.yaml``;
- ``prefect worker start --pool exitflow-process`` with ``EXITFLOW_REPO``, ``EXITFLOW_HOME``
  and ``EXITFLOW_REPORT_URL``, so runs started from the UI write to the same artifact root and
  link their reports;
- ``python -m http.server`` serving the artifact root (reports at
  ``artifacts/report/<key>/report.html``, an index at ``reports/index.html``).

Every command gets ``PREFECT_API_URL`` of that server: without it ``work-pool create`` and
``deploy`` would quietly start temporary servers of their own. What was started is recorded in
``<root>/serve.json``; ``stop`` ends exactly those process groups (and the flow runs the worker
started in sessions of their own) and nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from stores.artifacts import default_root
from stores.files import write_json_atomic

REPO = Path(__file__).resolve().parents[1]
POOL = "exitflow-process"
STATE_FILE = "serve.json"
LOG_DIR = "logs"
REPORTS_INDEX = "reports/index.html"
_CHILDREN: dict[int, subprocess.Popen] = {}  # started here: reaped by stop(), never garbage-collected while running


class ServeError(RuntimeError):
    """`serve` could not start or stop (a port in use, a process that died); the message says why
    and what to do."""


@dataclass
class ServedProcess:
    name: str
    pid: int  # also its process group and session id (start_new_session)
    created: float  # psutil create_time: a recycled pid is not ours
    log: str
    cmd: list[str]


@dataclass
class Served:
    """What ``start`` launched, as recorded in ``<root>/serve.json``."""

    root: str
    repo: str
    host: str
    port: int
    report_port: int
    ui_url: str
    api_url: str
    reports_url: str
    reports_index_url: str
    logs: str
    started: str
    processes: list[ServedProcess] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict) -> Served:
        return cls(**{**d, "processes": [ServedProcess(**p) for p in d.get("processes", [])]})


# -- queries -----------------------------------------------------------------------------------
def _root(root: str | Path | None) -> Path:
    return Path(root if root is not None else default_root()).expanduser().resolve()


def read_state(root: str | Path | None = None) -> Served | None:
    """The record in ``<root>/serve.json``, or None when there is none (or it is unreadable)."""
    path = _root(root) / STATE_FILE
    try:
        return Served.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _healthy(api_url: str, timeout: float) -> bool:
    import httpx

    try:
        return httpx.get(f"{api_url}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def running_api_url(root: str | Path | None = None, timeout: float = 1.0) -> str | None:
    """The API URL of the server ``serve`` started for this root, when it answers /api/health
    within ``timeout`` seconds; else None."""
    state = read_state(root)
    return state.api_url if state and _healthy(state.api_url, timeout) else None


def _alive(p: ServedProcess) -> bool:
    """The recorded process (or what is left of its process group) still runs."""
    try:
        proc = psutil.Process(p.pid)
        if abs(proc.create_time() - p.created) > 1.0:
            return False  # the pid was recycled by another program
        if proc.status() != psutil.STATUS_ZOMBIE:
            return True
    except psutil.NoSuchProcess:
        pass
    return bool(_group_members(p.pid))


def _group_members(pgid: int) -> list[psutil.Process]:
    """Live processes of a process group (the leader may be gone while its children remain)."""
    members = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                members.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


# -- start -------------------------------------------------------------------------------------
def _port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


def _env(root: Path, api_url: str) -> dict[str, str]:
    """The environment of everything ``serve`` runs: this server's API, a Prefect home under the
    artifact root, no analytics; no other PREFECT_* setting leaks in from the caller's shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(root / "prefect"), PREFECT_API_URL=api_url,
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", PREFECT_CLI_PROMPT="false")
    return env


def _launch(name: str, cmd: list[str], env: dict[str, str], logs: Path, cwd: Path) -> ServedProcess:
    log = logs / f"{name}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    _CHILDREN[proc.pid] = proc
    try:
        created = psutil.Process(proc.pid).create_time()
    except psutil.NoSuchProcess:
        created = time.time()
    return ServedProcess(name, proc.pid, created, str(log), cmd)


def _tail(path: str | Path, n: int = 3000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _wait_for(what: str, ready, proc: ServedProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if not _alive(proc):
            raise ServeError(f"the {what} exited while starting; its log ({proc.log}) ends:\n{_tail(proc.log)}")
        if time.monotonic() > deadline:
            raise ServeError(f"the {what} did not become ready in {timeout:.0f} s; its log ({proc.log}) ends:\n"
                             f"{_tail(proc.log)}")
        time.sleep(0.3)


def _prefect(args: list[str], env: dict[str, str], logs: Path, timeout: float) -> None:
    """One Prefect CLI command against the server, its output appended to logs/setup.log."""
    log = logs / "setup.log"
    with open(log, "ab") as out:
        out.write(f"\n$ prefect {' '.join(args)}\n".encode())
        out.flush()
        try:
            done = subprocess.run([sys.executable, "-m", "prefect", *args], check=False, cwd=REPO, env=env,
                                  stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ServeError(f"`prefect {' '.join(args)}` took over {timeout:.0f} s; see {log}") from None
    if done.returncode != 0:
        raise ServeError(f"`prefect {' '.join(args)}` failed (exit {done.returncode}); {log} ends:\n{_tail(log)}")


def _api(api_url: str):
    import httpx

    return httpx.Client(base_url=api_url, timeout=10)


def _ensure_pool(api_url: str, env: dict[str, str], logs: Path, timeout: float) -> None:
    with _api(api_url) as api:
        if api.get(f"/work_pools/{POOL}").status_code == 200:
            return  # an existing pool is fine (a restart keeps its settings)
    _prefect(["work-pool", "create", POOL, "--type", "process"], env, logs, timeout)


def _worker_registered(api_url: str) -> bool:
    with _api(api_url) as api:
        r = api.post(f"/work_pools/{POOL}/workers/filter", json={})
        return r.status_code == 200 and any(w.get("status") == "ONLINE" for w in r.json())


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=1.0).status_code < 500
    except httpx.HTTPError:
        return False


def start(root: str | Path | None = None, host: str = "127.0.0.1", port: int = 4200, report_port: int = 4201,
          wait: bool = True, timeout: float = 180.0) -> Served:
    """Start the Prefect server (UI), deploy every flow of prefect.yaml, start a worker and the
    report server, record them in ``<root>/serve.json`` and print where to look.

    Already running for this root: says so and returns the record. ``wait``: return only once
    the worker is online in the pool (else as soon as the deployments exist). ``timeout``: seconds
    allowed to each step. Raises :class:`ServeError` when a port is taken or a step fails, after
    stopping whatever it had started.
    """
    given = str(root) if root is not None else os.environ.get("EXITFLOW_HOME", "")
    if "://" in given and not given.startswith("file://"):
        raise ServeError(f"exitflow serve keeps the Prefect database, the worker's state and the reports under a "
                         f"local folder, and {given!r} is a URL; give --root a folder (runs started from the UI "
                         "can still put their artifacts at the URL: set its `root` parameter)")
    root = _root(given.removeprefix("file://") or None)
    state = read_state(root)
    if state is not None:
        if _healthy(state.api_url, 2.0):
            print(f"exitflow serve is already running for {root}")
            _print_addresses(state)
            return state
        stop(root, quiet=True)  # a stale record: end whatever is left of it first
    for p, var in ((port, "PORT"), (report_port, "REPORT_PORT")):
        if _port_in_use(host, p):
            raise ServeError(f"port {p} on {host} is in use by another program; stop it or pick a free port: "
                             f"`{var}={p + 10} make serve`")
    if port == report_port:
        raise ServeError(f"the UI and the reports need two ports; both are {port}: `REPORT_PORT={port + 1} make serve`")

    logs = root / LOG_DIR
    logs.mkdir(parents=True, exist_ok=True)
    (root / "prefect").mkdir(exist_ok=True)
    chost = _connect_host(host)
    ui_url = f"http://{chost}:{port}"
    reports_url = f"http://{chost}:{report_port}"
    state = Served(root=str(root), repo=str(REPO), host=host, port=port, report_port=report_port, ui_url=ui_url,
                   api_url=f"{ui_url}/api", reports_url=reports_url,
                   reports_index_url=f"{reports_url}/{REPORTS_INDEX}", logs=str(logs),
                   started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    env = _env(root, state.api_url)
    py = sys.executable

    def record(proc: ServedProcess) -> ServedProcess:
        state.processes.append(proc)
        write_json_atomic(root / STATE_FILE, asdict(state))  # stop() can end it even if start dies here
        return proc

    try:
        server = record(_launch("server", [py, "-m", "prefect", "server", "start", "--host", host, "--port", str(port),
                                           "--analytics-off"], env, logs, root))
        _wait_for("Prefect server", lambda: _healthy(state.api_url, 1.0), server, timeout)
        _ensure_pool(state.api_url, env, logs, timeout)
        _prefect(["--no-prompt", "deploy", "--all"], env, logs, max(timeout, 300.0))
        worker_env = {**env, "EXITFLOW_REPO": str(REPO), "EXITFLOW_HOME": str(root), "EXITFLOW_REPORT_URL": reports_url}
        worker = record(_launch("worker", [py, "-m", "prefect", "worker", "start", "--pool", POOL], worker_env,
                                logs, root))
        reports = record(_launch("reports", [py, "-m", "http.server", str(report_port), "--bind", host,
                                             "--directory", str(root)], env, logs, root))
        _wait_for("report server", lambda: _answers(f"{reports_url}/"), reports, timeout)
        if wait:
            _wait_for("worker", lambda: _worker_registered(state.api_url), worker, timeout)
    except BaseException:
        stop(root, quiet=True)
        raise
    _print_addresses(state)
    return state


def _print_addresses(state: Served) -> None:
    index = Path(state.root) / REPORTS_INDEX
    print(f"Prefect UI:     {state.ui_url}   (Deployments -> a deployment -> Run -> Custom run)")
    print(f"reports index:  {state.reports_index_url}"
          + ("" if index.is_file() else "   (written by the first run that builds a report)"))
    print(f"artifact root:  {state.root}")
    print(f"logs:           {state.logs}")
    default = Path(state.root) == _root(None)
    print("stop it all:    make stop" + ("" if default else f" ROOT={state.root}"))


# -- stop --------------------------------------------------------------------------------------
def _signal_all(procs: list[psutil.Process], sig: int) -> None:
    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.Error:
            pass


def _reap(pid: int) -> None:
    child = _CHILDREN.pop(pid, None)
    if child is not None:
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            _CHILDREN[pid] = child


def _ours(p: ServedProcess) -> list[psutil.Process]:
    """The recorded process, the rest of its process group, and its descendants (the worker
    starts each flow run in a session of its own)."""
    found: dict[int, psutil.Process] = {m.pid: m for m in _group_members(p.pid)}
    try:
        leader = psutil.Process(p.pid)
        if abs(leader.create_time() - p.created) <= 1.0:
            found[leader.pid] = leader
            found.update({c.pid: c for c in leader.children(recursive=True)})
        else:
            found.pop(p.pid, None)  # a recycled pid heads a group of another program
            return []
    except psutil.NoSuchProcess:
        pass
    for proc in list(found.values()):
        try:
            found.update({c.pid: c for c in proc.children(recursive=True)})
        except psutil.Error:
            pass
    return [proc for pid, proc in found.items() if pid != os.getpid() and _running(proc)]


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def stop(root: str | Path | None = None, timeout: float = 20.0, quiet: bool = False) -> list[str]:
    """End what ``start`` recorded for this root (SIGTERM, up to ``timeout`` s, then SIGKILL),
    remove ``serve.json`` and return the names of the processes that were still running."""
    root = _root(root)
    state = read_state(root)
    if state is None:
        if not quiet:
            print(f"nothing to stop: exitflow serve is not running for {root}")
        return []
    stopped = []
    for p in reversed(state.processes):  # the worker before the server it talks to
        procs = _ours(p)
        if not procs:
            _reap(p.pid)
            continue
        _signal_all(procs, signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        if alive:
            _signal_all(alive, signal.SIGKILL)
            psutil.wait_procs(alive, timeout=10)
        _reap(p.pid)
        stopped.append(p.name)
        if not quiet:
            print(f"stopped {p.name:8s} pid {p.pid}" + (f" ({len(procs) - 1} more in its group)" if len(procs) > 1 else ""))
    (root / STATE_FILE).unlink(missing_ok=True)
    if not quiet and not stopped:
        print(f"nothing was running for {root} (a stale {STATE_FILE} was removed)")
    return stopped


# -- status ------------------------------------------------------------------------------------
def status(root: str | Path | None = None) -> Served | None:
    """Print what ``serve`` runs for this root; return its record, or None when nothing runs."""
    root = _root(root)
    state = read_state(root)
    if state is None:
        print(f"exitflow serve is not running for {root}")
        return None
    for p in state.processes:
        print(f"{p.name:8s} pid {p.pid:<8d} {'running' if _alive(p) else 'NOT running'}   log: {p.log}")
    print(f"API {'answers' if _healthy(state.api_url, 2.0) else 'does NOT answer'} at {state.api_url}")
    _print_addresses(state)
    return state


# -- command line ------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.serve",
                                description="The Prefect UI with every exitflow deployment, a worker and the "
                                "HTML reports: start, stop, status.")
    p.add_argument("command", choices=("start", "stop", "status"))
    p.add_argument("--root", type=Path, default=None, help="artifact root (default: $EXITFLOW_HOME or ./.exitflow)")
    p.add_argument("--host", default="127.0.0.1", help="address the UI and the reports listen on")
    p.add_argument("--port", type=int, default=4200, help="Prefect UI and API port")
    p.add_argument("--report-port", type=int, default=4201, help="port of the HTML report server")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds allowed to each start-up step")
    args = p.parse_args(argv)
    return run_command(args.command, args.root, host=args.host, port=args.port, report_port=args.report_port,
                       timeout=args.timeout)


def run_command(command: str, root: str | Path | None, host: str = "127.0.0.1", port: int = 4200,
                report_port: int = 4201, timeout: float = 180.0) -> int:
    """`start` (or `serve`), `stop` or `status` for a command line; a ServeError is one line, exit 1."""
    try:
        if command in ("start", "serve"):
            start(root, host=host, port=port, report_port=report_port, timeout=timeout)
        elif command == "stop":
            stop(root)
        else:
            status(root)
    except ServeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
