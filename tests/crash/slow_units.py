"""EXITFLOW_TEST_UNIT_DELAY=<seconds>: every progress-bar update sleeps that long first, so a
kill can land between units of work of the tiny test model (microseconds each otherwise).
Sleeping changes no result.

Imported by the crash runner (`run_stage.py`), and preloaded into every Dask worker process it
starts (``DASK_DISTRIBUTED__WORKER__PRELOAD``), where sharded extraction does its work.
"""

from __future__ import annotations

import os
import time

from pipeline import progress


def slow_down_units() -> None:
    delay = float(os.environ.get("EXITFLOW_TEST_UNIT_DELAY", "0"))
    if not delay or getattr(progress.ProgressBar.update, "slowed", False):
        return
    update = progress.ProgressBar.update

    def slow_update(self, n=1):
        time.sleep(delay)
        return update(self, n)

    slow_update.slowed = True
    progress.ProgressBar.update = slow_update


def dask_setup(worker) -> None:  # the hook Dask calls in a worker that preloads this file
    slow_down_units()
