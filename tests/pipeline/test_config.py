import pytest

from pipeline.config import Config, ConfigError, apply_overrides, load_config


def test_defaults_validate():
    cfg = load_config()
    assert cfg.extract.layers == [6, 12, 18, 24]
    assert cfg.model.source == "embedded:smollm2"


def test_every_problem_reported_at_once(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("extract:\n  layers: []\n  batch_size: 0\ndata:\n  seq_len: 1\nmodel:\n  quantisation: 4bit\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    msg = str(e.value)
    assert "4 problems" in msg
    for where in ("extract.layers", "extract.batch_size", "data.seq_len", "model.quantisation"):
        assert where in msg
    assert "unknown key" in msg


def test_overrides_are_typed():
    cfg = load_config(None, ["extract.layers=[2,1]", "extract.batch_size=4", "model.trust_remote_code=true"])
    assert cfg.extract.layers == [1, 2]
    assert cfg.extract.batch_size == 4
    assert cfg.model.trust_remote_code is True


def test_artifact_keys_given_with_set_stay_strings():
    """A key prefix can be all digits (or digits with a leading 0, which YAML reads as octal)."""
    cfg = load_config(None, ["inputs.heads=313476684347", "inputs.gates=0123", "inputs.train_cache=4e5f"])
    assert (cfg.inputs.heads, cfg.inputs.gates, cfg.inputs.train_cache) == ("313476684347", "0123", "4e5f")


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["extract.layers"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_calibration_levels_outside_unit_interval():
    with pytest.raises(ConfigError, match=r"1\.5"):
        load_config(None, ["calibrate.levels=[0.9, 1.5]"])


def test_shipped_configs_validate():
    from pathlib import Path

    for f in sorted(Path(__file__).parents[2].glob("configs/*.yaml")):
        assert isinstance(load_config(f), Config)


def test_one_set_of_defaults_config_files_set_only_what_differs():
    """The pydantic defaults are the defaults: a YAML file under configs/ that repeats one
    would be a second source of truth that can drift from the first."""
    import yaml
    from pathlib import Path

    defaults = Config().model_dump(mode="json")
    files = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
    for path in files:
        data = yaml.safe_load(path.read_text()) or {}
        load_config(path)  # valid
        same = [f"{s}.{k}" for s, section in data.items() for k, v in section.items() if defaults[s][k] == v]
        assert not same, f"{path.name} repeats defaults {same}; drop them"


def test_the_embedded_default_trains_with_the_efficient_loss():
    heads = load_config().heads
    assert (heads.efficient_loss, heads.lr, heads.warmup_steps) == (True, 3e-3, 20)
