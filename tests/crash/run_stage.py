"""Run one stage to completion in its own process, for the kill -9 tests.

    python tests/crash/run_stage.py ROOT STAGE PARAMS_JSON INPUTS_JSON [section.key=value ...]

Prints the artifact key. With EXITFLOW_TEST_UNIT_DELAY=<seconds>, every progress-bar update
sleeps that long first (`slow_units.py`; in the Dask workers of a sharded extraction too): the
tiny test model finishes a unit of work in microseconds, and a kill must be able to land
between units. Sleeping changes no result. With
EXITFLOW_TEST_TOPK_BATCH_ROWS=<rows>, the top-k pass works (and resumes) in batches of that
many rows.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from slow_units import slow_down_units  # noqa: E402

from flows.stages import make_stage  # noqa: E402
from flows.stages.base import StageContext, run_stage  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from stores.artifacts import ArtifactStore  # noqa: E402


def main() -> None:
    root, stage, params, inputs, *overrides = sys.argv[1:]
    torch.set_num_threads(1)
    slow_down_units()
    os.environ.setdefault("DASK_DISTRIBUTED__WORKER__PRELOAD", json.dumps([str(Path(__file__).with_name("slow_units.py"))]))
    rows = os.environ.get("EXITFLOW_TEST_TOPK_BATCH_ROWS")
    if rows:  # more, smaller top-k batches: more points to be killed at (the rows' top-k do not change)
        import flows.stages.teacher_topk as teacher_topk

        teacher_topk.TOPK_BATCH_ROWS = int(rows)
    ctx = StageContext(load_config(None, overrides), ArtifactStore(root), progress=True)
    print(run_stage(make_stage(stage, **json.loads(params)), ctx, json.loads(inputs)), flush=True)


if __name__ == "__main__":
    main()
