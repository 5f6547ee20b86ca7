"""The temporary Prefect server's own process (see flows/server_process.py), run as a script:
``python server_child.py PARENT_PID UVICORN_ARGS...``.

Before uvicorn starts it arranges to stop when the CLI that started it is gone, whatever
killed the CLI: on Linux the kernel sends it SIGTERM when its parent dies
(``PR_SET_PDEATHSIG``); everywhere a thread reads the pipe the CLI holds open as its stdin and
sends SIGTERM when it closes (the kernel closes it when the CLI dies, ``kill -9`` included).
uvicorn then shuts down gracefully; if it has not after 10 s, the process exits anyway.
"""

import os
import signal
import sys
import threading
import time

GRACE_S = 10.0


def _orphaned() -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE_S)
    os._exit(1)


def _watch_parent_pipe() -> None:
    # os.read, not sys.stdin: a daemon thread blocked in a buffered read aborts the interpreter's
    # exit ("could not acquire lock for <stdin>") when uvicorn ends first.
    while os.read(0, 4096):  # b"" at EOF: the parent closed its end, or died
        pass
    _orphaned()


def main() -> None:
    parent = int(sys.argv[1])
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    threading.Thread(target=_watch_parent_pipe, daemon=True).start()
    if os.getppid() != parent:  # the parent died before the death signal was armed
        _orphaned()
    from uvicorn.main import main as uvicorn_main

    uvicorn_main(args=sys.argv[2:], prog_name="uvicorn")


if __name__ == "__main__":
    sys.path.pop(0)  # this file's folder: none of its modules may shadow what the server imports
    main()
