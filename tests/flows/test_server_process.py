"""The CLI's temporary Prefect server: a start that fails is one error naming its output and
the fix, and nothing is left running."""

from __future__ import annotations

import socket

import pytest

from flows.server_process import ServerStartError, TemporaryServer


@pytest.mark.slow
def test_a_server_that_cannot_bind_its_port_is_reported_with_its_output(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = TemporaryServer(tmp_path / "prefect-home", port=taken.getsockname()[1])
        server.start()
        proc = server.proc
        with pytest.raises(ServerStartError, match=r"exited with code -?\d+ while starting(.|\n)*address already in use"
                           r"(.|\n)*exitflow serve"):
            server.wait_ready(60)
    assert proc.poll() is not None and server.proc is None
