"""The Prefect API server of one `exitflow run`, as a child process the CLI controls.

Without ``PREFECT_API_URL`` Prefect starts a temporary server of its own; that one is a plain
child in the terminal's process group, so a Ctrl-C kills it before the run can report its
state (the run then retries the dead API for minutes), and a ``kill -9`` of the run leaves
it behind. This module starts the same server (Prefect's API app under uvicorn, without UI
and background services, as Prefect's own temporary server runs it) so that:

- it has a session of its own: a signal to the terminal's process group never reaches it,
  and the CLI alone decides when it stops (after the run has reported its state);
- it dies with the CLI whatever kills the CLI: on Linux the kernel sends it SIGTERM when the
  CLI exits (``PR_SET_PDEATHSIG``), and everywhere it watches a pipe from the CLI and stops
  when that pipe closes, which the kernel does when the CLI dies, ``kill -9`` included;
- it starts while the CLI imports and plans (the port is chosen first, so ``PREFECT_API_URL``
  is set before Prefect is imported: Prefect reads its settings once), and the CLI waits for
  ``/api/health`` only when the flow is about to start.

The database is SQLite under ``PREFECT_HOME`` (``~/.prefect`` unless set), the one Prefect's
own temporary server would use: it exists after the first run, and a new one costs ~10 s of
migrations.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD_SCRIPT = Path(__file__).with_name("server_child.py")
"""Run by path, not as a module: the child needs no import path of this package."""


class ServerStartError(RuntimeError):
    """The temporary Prefect server did not come up; the message carries the end of its output."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS had free a moment ago (another program may still take it before the server
    binds it; :meth:`TemporaryServer.wait_ready` then reports the server's error)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class TemporaryServer:
    """Prefect's API server as a child of this process, started by :meth:`start` and ended by
    :meth:`stop` (also when this process dies without calling it)."""

    def __init__(self, home: str | Path | None = None, host: str = "127.0.0.1", port: int | None = None):
        self.home = Path(home) if home else None
        self.host = host
        self.port = port or free_port(host)
        self.proc: subprocess.Popen | None = None
        self._output = None

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.port}/api"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> str:
        """Launch the server (returns at once with its API URL; :meth:`wait_ready` waits)."""
        # Located, not imported: Prefect reads its settings (PREFECT_API_URL) at import.
        prefect_dir = Path(importlib.util.find_spec("prefect").origin).resolve().parent.parent
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        if self.home is not None:
            self.home.mkdir(parents=True, exist_ok=True)
            env["PREFECT_HOME"] = str(self.home)
        env.update(PREFECT_UI_ENABLED="0", PREFECT__SERVER_EPHEMERAL="1",
                   PREFECT__SERVER_FINAL="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
        cmd = [sys.executable, str(CHILD_SCRIPT), str(os.getpid()), "--app-dir", str(prefect_dir), "--factory",
               "prefect.server.api.server:create_app", "--host", self.host, "--port", str(self.port),
               "--log-level", "error", "--lifespan", "on"]
        self._output = tempfile.TemporaryFile()
        kwargs: dict = {"start_new_session": True}
        if os.name == "nt":  # pragma: no cover
            kwargs = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=self._output,
                                     stderr=subprocess.STDOUT, **kwargs)
        return self.api_url

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Return once ``/api/health`` answers; raise :class:`ServerStartError` (after stopping
        it) when the server exits or does not answer within ``timeout`` seconds."""
        import httpx

        assert self.proc is not None, "start() first"
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=1.0) as client:
            while True:
                if self.proc.poll() is not None:
                    problem = f"exited with code {self.proc.returncode} while starting"
                    break
                try:
                    if client.get(f"{self.api_url}/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    problem = f"did not answer {self.api_url}/health within {timeout:.0f} s"
                    break
                time.sleep(0.1)
        tail = self._tail()
        self.stop()
        home = self.home or os.environ.get("PREFECT_HOME") or "~/.prefect"
        raise ServerStartError(f"the temporary Prefect server (PREFECT_HOME={home}) {problem}; its output ends:\n"
                               f"{tail}\nStart one with `exitflow serve`, or point PREFECT_API_URL at one, and run again")

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, up to ``timeout`` seconds, then SIGKILL; idempotent."""
        proc, self.proc = self.proc, None
        if proc is not None:
            try:
                proc.stdin.close()
            except OSError:
                pass
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self._output is not None:
            self._output.close()
            self._output = None

    def _tail(self, n: int = 3000) -> str:
        if self._output is None:
            return ""
        self._output.seek(0)
        return self._output.read().decode(errors="replace")[-n:]


def drain_prefect_clients(timeout: float = 5.0) -> None:
    """Send what Prefect's background workers still hold (run logs, events) before the server
    they talk to stops; otherwise they print connection errors at exit. A no-op when Prefect
    was never imported."""
    if "prefect" not in sys.modules:
        return
    try:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        for worker in (APILogWorker, EventsWorker):
            worker.drain_all(timeout=timeout)
    except Exception:  # noqa: BLE001 - best effort: the run's outcome is already decided
        pass
