"""prefect.cluster.yaml, the cluster example: every deployment names a real flow with parameters
its typed sections accept, runs in the image deploy/Dockerfile builds, and reads its artifact root
from the environment the pool gives it."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest
import yaml

from pipeline import config as C

REPO = Path(__file__).resolve().parents[2]
SECTIONS = {"model": C.ModelConfig, "data": C.DataConfig, "extract": C.ExtractConfig, "heads": C.HeadsConfig,
            "gates": C.GatesConfig, "calibrate": C.CalibrateConfig, "quantize": C.QuantizeConfig,
            "evaluate": C.EvaluateConfig, "inputs": C.InputsConfig}


@pytest.fixture(scope="module")
def spec() -> dict:
    return yaml.safe_load((REPO / "prefect.cluster.yaml").read_text())


def _flow(entrypoint: str):
    module, name = entrypoint.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def test_every_deployment_is_a_flow_with_valid_typed_parameters(spec):
    from prefect import Flow

    assert spec["name"] == "exitflow" and spec["deployments"]
    for d in spec["deployments"]:
        flow = _flow(d["entrypoint"])
        assert isinstance(flow, Flow), d["name"]
        params = inspect.signature(flow.fn).parameters
        for name, value in (d.get("parameters") or {}).items():
            assert name in params, f"{d['name']}: {name} is not a parameter of {d['entrypoint']}"
            if name in SECTIONS:
                SECTIONS[name].model_validate(value)  # what Prefect does with the form
        assert d["work_pool"]["name"] in {"exitflow-k8s", "exitflow-docker"}


def test_each_split_extracts_in_its_own_run_sharded_over_a_dask_cluster(spec):
    extracts = {d["parameters"]["split"]: d for d in spec["deployments"] if d["entrypoint"].endswith("extract_flow")}
    assert set(extracts) == {"train", "calib", "eval"}
    for d in extracts.values():
        ex = C.ExtractConfig.model_validate(d["parameters"]["extract"])
        assert ex.cluster and ex.cluster.startswith("tcp://")
        assert C.ModelConfig.model_validate(d["parameters"]["model"]).dtype == "bfloat16"


def test_runs_read_the_root_from_the_pool_environment(spec):
    for d in spec["deployments"]:
        env = d["work_pool"]["job_variables"]["env"]
        assert env["EXITFLOW_HOME"] == "{{ $EXITFLOW_ROOT }}"  # resolved at deploy time from the shell
        assert env["HF_HUB_OFFLINE"] == "1" and env["EXITFLOW_MIRROR"]
        assert d["work_pool"]["job_variables"]["image"] == "{{ $EXITFLOW_IMAGE }}"


def test_the_image_holds_every_package_and_the_pull_step_finds_it(spec):
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    workdir = re.search(r"^WORKDIR (\S+)", dockerfile, re.M).group(1)
    assert spec["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": workdir}}]
    include = re.search(r"^include = \[(.*)\]$", (REPO / "pyproject.toml").read_text(), re.M).group(1)
    packages = re.findall(r'"(\w+)\*?"', include)
    copied = set(re.findall(r"^COPY (\w+) \1$", dockerfile, re.M))
    assert packages and set(packages) <= copied
    assert "s3fs" in dockerfile and "gcsfs" in dockerfile
