"""File checkpoints: atomic replacement, fallback to the previous state, exact round trips."""

from __future__ import annotations

import os

import pytest
import torch

import stores.checkpoints as checkpoints_module
from stores.checkpoints import CheckpointError, FileCheckpoints


def make_training(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def train_steps(model, opt, sched, n: int, gen: torch.Generator) -> None:
    for _ in range(n):
        x = torch.randn(16, 8, generator=gen)  # [16, 8]
        loss = model(x).pow(2).mean() + torch.rand(1).item() * 0  # consumes the global RNG too
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def snapshot(model, opt, sched, gen) -> dict:
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "generator": gen.get_state()}, "epochs_done": 1,
            "history": [{"epoch": 0, "loss": 0.5, "agreement": {6: 0.25}}]}


def test_load_is_none_before_any_save(tmp_path):
    assert FileCheckpoints(tmp_path / "nothing").load() is None
    assert not (tmp_path / "nothing").exists()  # loading creates nothing


def test_round_trip_resumes_training_exactly(tmp_path):
    """Save mid-training, restore into fresh objects, continue: identical to never stopping,
    which needs model, optimizer moments, scheduler position and both RNG streams."""
    model, opt, sched = make_training()
    gen = torch.Generator().manual_seed(1)
    train_steps(model, opt, sched, 3, gen)
    ckpt = FileCheckpoints(tmp_path / "c")
    ckpt.save(snapshot(model, opt, sched, gen))
    train_steps(model, opt, sched, 4, gen)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    torch.manual_seed(99)  # disturb the global stream; the checkpoint must restore it
    model2, opt2, sched2 = make_training(seed=5)
    gen2 = torch.Generator()
    state = ckpt.load()
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    gen2.set_state(state["rng"]["generator"])
    assert state["history"] == [{"epoch": 0, "loss": 0.5, "agreement": {6: 0.25}}]
    assert sched2.last_epoch == 3 and opt2.state_dict()["state"][0]["step"] == 3
    train_steps(model2, opt2, sched2, 4, gen2)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_each_save_replaces_last_and_keeps_the_previous(tmp_path):
    ckpt = FileCheckpoints(tmp_path / "c")
    ckpt.save({"epochs_done": 1})
    assert not ckpt.previous_path.exists()
    ckpt.save({"epochs_done": 2})
    assert ckpt.load() == {"epochs_done": 2}
    assert torch.load(ckpt.previous_path, weights_only=True) == {"epochs_done": 1}
    assert sorted(p.name for p in ckpt.folder.iterdir()) == ["last.pt", "previous.pt"]  # no temp files

    lean = FileCheckpoints(tmp_path / "lean", keep_previous=False)
    lean.save({"epochs_done": 1})
    lean.save({"epochs_done": 2})
    assert sorted(p.name for p in lean.folder.iterdir()) == ["last.pt"]


def test_a_crash_while_writing_leaves_the_previous_state(tmp_path, monkeypatch):
    ckpt = FileCheckpoints(tmp_path / "c")
    ckpt.save({"epochs_done": 1, "w": torch.ones(3)})
    before = ckpt.last_path.read_bytes()

    def torn_save(obj, f):
        f.write(b"PK\x03\x04 half a zip")  # some bytes reach the temp file, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints_module.torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save({"epochs_done": 2, "w": torch.zeros(3)})
    assert ckpt.last_path.read_bytes() == before
    assert [p.name for p in ckpt.folder.iterdir()] == ["last.pt"]  # the torn temp file is gone
    monkeypatch.undo()
    state = ckpt.load()
    assert state["epochs_done"] == 1 and torch.equal(state["w"], torch.ones(3))


def test_a_crash_between_the_renames_loads_the_previous_state(tmp_path, monkeypatch):
    ckpt = FileCheckpoints(tmp_path / "c")
    ckpt.save({"epochs_done": 1})
    real_replace = os.replace
    calls = []

    def dying_replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # last.pt already moved to previous.pt; the new one never lands
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(checkpoints_module.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save({"epochs_done": 2})
    monkeypatch.undo()
    assert not ckpt.last_path.exists()
    assert ckpt.load() == {"epochs_done": 1}
    ckpt.save({"epochs_done": 2})  # and saving goes on normally from there
    assert ckpt.load() == {"epochs_done": 2}


def test_an_unreadable_last_falls_back_then_fails_with_the_fix(tmp_path):
    ckpt = FileCheckpoints(tmp_path / "c")
    ckpt.save({"epochs_done": 1})
    ckpt.save({"epochs_done": 2})
    ckpt.last_path.write_bytes(b"not a checkpoint")  # e.g. a disk error; atomic saves never do this
    assert ckpt.load() == {"epochs_done": 1}
    ckpt.previous_path.write_bytes(b"nor this")
    with pytest.raises(CheckpointError, match=r"(?s)last\.pt.*previous\.pt.*Delete the folder"):
        ckpt.load()


def test_load_never_runs_pickled_code(tmp_path):
    ckpt = FileCheckpoints(tmp_path / "c")
    ckpt.folder.mkdir()
    torch.save({"evil": os.getcwd, "epochs_done": 1}, ckpt.last_path)  # an arbitrary global: refused
    with pytest.raises(CheckpointError):
        ckpt.load()
