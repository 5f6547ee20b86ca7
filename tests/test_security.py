"""What a downloaded file or a neighbour on the network can make exitflow do: servers listen on
127.0.0.1 unless told otherwise, weights and checkpoints load without unpickling code, and a
hub model's own code runs only with model.trust_remote_code."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "flows", "stores", "reports", "benchmarks")
LOOPBACK = "127.0.0.1"


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            yield node


def _dotted(func: ast.expr) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def _keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


# -- listening ---------------------------------------------------------------------------------
def test_every_server_listens_on_loopback_unless_told_otherwise():
    from flows import serve, server_process
    from flows.cli import build_parser

    assert build_parser().parse_args(["serve"]).host == LOOPBACK
    assert inspect.signature(serve.start).parameters["host"].default == LOOPBACK
    assert inspect.signature(server_process.TemporaryServer).parameters["host"].default == LOOPBACK
    assert inspect.signature(server_process.free_port).parameters["host"].default == LOOPBACK


def test_no_host_default_in_the_code_is_a_wildcard():
    """Every `host` parameter default and every `--host` option default is the loopback address."""
    found = 0
    for path in _sources():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.args + node.args.kwonlyargs
                defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults
                defaults += node.args.kw_defaults
                for arg, default in zip(args, defaults):
                    if arg.arg == "host" and isinstance(default, ast.Constant):
                        found += 1
                        assert default.value == LOOPBACK, f"{path.relative_to(REPO)}:{node.lineno} {node.name}"
            elif isinstance(node, ast.Call) and _dotted(node.func).endswith("add_argument") and node.args \
                    and isinstance(node.args[0], ast.Constant) and node.args[0].value == "--host":
                found += 1
                default = _keyword(node, "default")
                assert isinstance(default, ast.Constant) and default.value == LOOPBACK, path
    assert found >= 4  # serve.start, TemporaryServer, free_port and the two --host options at least


# -- unpickling --------------------------------------------------------------------------------
def test_torch_load_is_always_weights_only():
    for path in _sources():
        for call in _calls(path):
            if _dotted(call.func) == "torch.load":
                flag = _keyword(call, "weights_only")
                assert isinstance(flag, ast.Constant) and flag.value is True, \
                    f"{path.relative_to(REPO)}:{call.lineno}: torch.load without weights_only=True runs pickled code"


def test_nothing_unpickles():
    for path in _sources():
        for call in _calls(path):
            name = _dotted(call.func)
            assert name not in ("pickle.load", "pickle.loads", "joblib.load", "dill.load", "cloudpickle.load"), \
                f"{path.relative_to(REPO)}:{call.lineno}: {name}"
            if name.endswith("load") and name.startswith(("np.", "numpy.")):
                flag = _keyword(call, "allow_pickle")
                assert flag is None or (isinstance(flag, ast.Constant) and flag.value is False), \
                    f"{path.relative_to(REPO)}:{call.lineno}: np.load with allow_pickle"


def test_a_checkpoint_with_code_in_it_is_refused(tmp_path, capsys):
    """stores/checkpoints.py reads with weights_only=True: a pickle that would run code fails."""
    import torch

    from stores.checkpoints import CheckpointError, FileCheckpoints

    class Payload:
        def __reduce__(self):
            return (print, ("this ran",))

    ckpt = FileCheckpoints(tmp_path, keep_previous=False)
    ckpt.save({"epochs_done": 1, "payload": Payload()})
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        ckpt.load()
    assert "this ran" not in capsys.readouterr().out
    torch.save({"epochs_done": 1}, tmp_path / "plain.pt")  # plain values still load
    assert torch.load(tmp_path / "plain.pt", weights_only=True) == {"epochs_done": 1}


# -- remote code -------------------------------------------------------------------------------
def test_every_from_pretrained_call_carries_trust_remote_code():
    """Each call passes trust_remote_code itself or through a `**` mapping (the backbone's
    load kwargs, checked by the next test); none hard-codes True."""
    seen = 0
    for path in _sources():
        for call in _calls(path):
            if _dotted(call.func).endswith("from_pretrained") or _dotted(call.func).endswith("load_dataset"):
                seen += 1
                flag = _keyword(call, "trust_remote_code")
                assert not (isinstance(flag, ast.Constant) and flag.value is True), f"{path}:{call.lineno}"
                if _dotted(call.func).endswith("from_pretrained"):
                    assert flag is not None or any(k.arg is None for k in call.keywords), \
                        f"{path.relative_to(REPO)}:{call.lineno}: from_pretrained without trust_remote_code"
    assert seen >= 3


class _Stop(Exception):
    pass


@pytest.mark.parametrize("trust", [False, True])
def test_the_backbone_passes_the_configured_trust_remote_code(monkeypatch, tiny_model_dir, trust):
    import transformers

    from pipeline.backbone import load_backbone
    from pipeline.config import ModelConfig

    seen: dict[str, dict] = {}
    real_tokenizer = transformers.AutoTokenizer.from_pretrained

    def tokenizer(*args, **kwargs):
        seen["tokenizer"] = kwargs
        return real_tokenizer(*args, **kwargs)

    def model(*args, **kwargs):
        seen["model"] = kwargs
        raise _Stop

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tokenizer)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model)
    with pytest.raises(_Stop):
        load_backbone(ModelConfig(source=str(tiny_model_dir), trust_remote_code=trust))
    assert seen["tokenizer"]["trust_remote_code"] is trust and seen["model"]["trust_remote_code"] is trust
