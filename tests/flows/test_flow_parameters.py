"""The run forms of the Prefect UI come from the flows' parameter schemas: every setting a
flow uses is a typed field with its default and a one-line help, choices are enums, and an
invalid value is refused naming the field, before any work."""

from __future__ import annotations

import pytest

from flows.dag import FLOWS
from flows.recalibrate import recalibrate_flow
from pipeline.config import Config, ConfigError, load_config

ALL_FLOWS = {**FLOWS, "recalibrate": recalibrate_flow}


def _schema(flow) -> dict:
    from prefect.utilities.callables import parameter_schema

    return parameter_schema(flow.fn).model_dump()


@pytest.mark.parametrize("name", sorted(ALL_FLOWS))
def test_every_field_of_every_form_has_a_type_a_default_and_help(name):
    schema = _schema(ALL_FLOWS[name])
    props, defs = schema["properties"], schema["definitions"]
    assert not schema["required"], f"{name}: a form with required fields cannot be submitted as it opens"
    for param, spec in props.items():
        assert spec.get("description"), f"{name}.{param} has no help text"
        assert "default" in spec, f"{name}.{param} has no default"
        if "$ref" in spec:
            section = defs[spec["$ref"].rsplit("/", 1)[1]]
            for field, fspec in section["properties"].items():
                assert fspec.get("description"), f"{name}: {param}.{field} has no help text"
                assert "default" in fspec, f"{name}: {param}.{field} has no default"
                assert "type" in fspec or "anyOf" in fspec or "enum" in fspec, f"{name}: {param}.{field} is untyped"


def test_the_sections_a_flow_uses_are_its_fields():
    sections = set(Config.model_fields)
    assert set(_schema(FLOWS["extract"])["properties"]) & sections == {"model", "data", "extract"}
    assert set(_schema(FLOWS["train_heads"])["properties"]) & sections == {"inputs", "model", "data", "extract", "heads"}
    assert set(_schema(FLOWS["pipeline"])["properties"]) & sections == sections


def test_choices_are_enums():
    schema = _schema(FLOWS["evaluate"])
    defs = schema["definitions"]

    def enum_of(section: str, field: str) -> list:
        spec = defs[section]["properties"][field]
        return spec.get("enum") or next(s["enum"] for s in spec["anyOf"] if "enum" in s)

    assert enum_of("HeadsConfig", "kind") == ["linear", "adapter"]
    assert enum_of("HeadsConfig", "loss") == ["kl", "ce", "mix"]
    assert enum_of("CalibrateConfig", "method") == ["ltt", "empirical"]
    split = _schema(FLOWS["extract"])["properties"]["split"]
    assert next(s["enum"] for s in split["anyOf"] if "enum" in s) == ["train", "calib", "eval"]


@pytest.mark.parametrize(("params", "field"), [
    ({"split": "validation"}, "split"),
    ({"extract": {"layers": [0]}}, "extract.layers"),
    ({"data": {"seq_len": 1}}, "data.seq_len"),
])
def test_an_invalid_form_value_is_refused_naming_the_field(prefect_env, tmp_path, params, field):
    from prefect.exceptions import ParameterTypeError

    with pytest.raises(ParameterTypeError, match=rf"- {field}: "):
        FLOWS["extract"](root=str(tmp_path / "root"), **params)
    assert not (tmp_path / "root" / "artifacts").exists()


def test_form_fields_override_the_file_only_where_they_differ_from_the_defaults(tmp_path):
    from pipeline.config import ExtractConfig, HeadsConfig

    path = tmp_path / "c.yaml"
    path.write_text("heads:\n  epochs: 5\n  rank: 8\nextract:\n  layers: [2, 4]\n")
    cfg = load_config(path, ["heads.lr=0.01"], {"heads": HeadsConfig(rank=16), "extract": ExtractConfig()})
    assert cfg.heads.epochs == 5  # form left at its default: the file's value
    assert cfg.heads.rank == 16  # form changed it: the form's value
    assert cfg.extract.layers == [2, 4]
    assert cfg.heads.lr == 0.01  # overrides last
    cfg = load_config(path, [], {"heads": {"kind": "linear"}})  # a form's raw dict is validated too
    assert cfg.heads.kind == "linear" and cfg.heads.epochs == 5
    with pytest.raises(ConfigError, match=r"heads\.kind = 'conv'"):
        load_config(None, [], {"heads": {"kind": "conv"}})


def test_inputs_accept_current_and_latest(tmp_path):
    from stores.artifacts import ArtifactNotFound, ArtifactStore, Manifest

    store = ArtifactStore(tmp_path)

    def put(stage: str, key: str, inputs: dict) -> None:
        store.staging(stage, key)
        store.publish(Manifest(stage=stage, key=key, config={}, inputs=inputs, code_version="t"))

    with pytest.raises(ArtifactNotFound, match="no `current` run"):
        store.resolve_input("current", "heads", "train_heads")
    put("extract", "c" * 64, {})
    put("train_heads", "d" * 64, {"cache": "c" * 64})
    put("calibrate", "e" * 64, {"heads": "d" * 64})
    store.set_pointer("current", "calibrate", "e" * 64, reason="first calibration")
    store.set_pointer("latest", "calibrate", "e" * 64, heads="d" * 64)
    assert store.resolve_input("current", "heads", "train_heads").key == "d" * 64
    assert store.resolve_input("current", "train_cache", "extract").key == "c" * 64
    assert store.resolve_input("latest", "heads", "train_heads").key == "d" * 64
    assert store.resolve_input("dddd", "heads", "train_heads").key == "d" * 64
    with pytest.raises(ArtifactNotFound, match="has no gates"):
        store.resolve_input("current", "gates", "train_gates")
