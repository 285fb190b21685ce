"""Checkpoint save/load: exact resume, crash safety, pruning, validation, weights_only, two-rank gloo."""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from caopd_megatron.checkpointing import checkpoint as ckpt_mod
from caopd_megatron.checkpointing.checkpoint import (CheckpointError, TrainState, latest_checkpoint,
                                                     load_checkpoint, save_checkpoint)
from dist_harness import run_distributed

CONFIG = "model:\n  hidden: 16\nrun:\n  seed: 0\n"


def _build(seed: int, hidden: int = 16):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Dropout(0.3), nn.Linear(hidden, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.5 * s))
    return model, opt, sched


def _train(model, opt, sched, n: int) -> list[float]:
    """Draws data from torch, python and numpy RNGs and uses dropout, so every stream must be restored."""
    losses = []
    model.train()
    for _ in range(n):
        x = torch.randn(4, 8)
        y = torch.randn(4, 1)
        scale = 1.0 + random.random() + float(np.random.rand())
        loss = ((model(x) - y) ** 2).mean() * scale
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _save(run_dir: Path, step: int, model, opt, sched, teacher=None, keep_last: int = 2, **state_kw) -> Path:
    state = TrainState(step=step, data_position=state_kw.pop("data_position", {"step": step}), **state_kw)
    return save_checkpoint(run_dir, step, student=model, optimizer=opt, scheduler=sched, teacher=teacher,
                           state=state, config_yaml=CONFIG, keep_last=keep_last)


def test_roundtrip_restores_weights_optimizer_scheduler_rng_and_position(tmp_path):
    _seed_all(0)
    model, opt, sched = _build(0)
    teacher = nn.Linear(8, 1)
    _train(model, opt, sched, 2)
    pos = {"step": 12, "epoch": 0, "cursor": 384}
    meta = {"note": "warm", "ints": {1: 2}, "tuple": (1, 2.5), "tensor": torch.arange(3)}
    path = save_checkpoint(tmp_path, 12, student=model, optimizer=opt, scheduler=sched, teacher=teacher,
                           state=TrainState(step=12, data_position=pos, metadata=meta), config_yaml=CONFIG)
    expected_rand = (torch.rand(5), random.random(), np.random.rand())

    assert path == tmp_path / "checkpoints" / "step_000012"
    assert sorted(os.listdir(path)) == ["meta.json", "rank_00000.pt"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000012"
    m = json.loads((path / "meta.json").read_text())
    assert m["complete"] is True and list(m)[-1] == "complete"
    assert m["step"] == 12 and m["config_yaml"] == CONFIG
    assert m["layout"]["world_size"] == 1 and m["layout"]["tensor_model_parallel_size"] == 1

    _seed_all(99)
    model2, opt2, sched2 = _build(1)
    teacher2 = nn.Linear(8, 1)
    state = load_checkpoint(tmp_path, student=model2, optimizer=opt2, scheduler=sched2, teacher=teacher2)
    assert (torch.rand(5).tolist(), random.random(), np.random.rand()) == \
        (expected_rand[0].tolist(), expected_rand[1], expected_rand[2])

    assert state.step == 12 and state.data_position == pos
    assert state.metadata["ints"] == {1: 2} and state.metadata["tuple"] == (1, 2.5)
    assert torch.equal(state.metadata["tensor"], torch.arange(3))
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(teacher.state_dict().values(), teacher2.state_dict().values()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for pid in s1["state"]:
        for k in s1["state"][pid]:
            assert torch.equal(s1["state"][pid][k], s2["state"][pid][k])
    assert sched.state_dict() == sched2.state_dict()
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_resume_is_bitwise_equal_to_uninterrupted_run(tmp_path):
    _seed_all(7)
    model, opt, sched = _build(7)
    uninterrupted = _train(model, opt, sched, 6)
    final_weights = [t.clone() for t in model.state_dict().values()]

    _seed_all(7)
    model, opt, sched = _build(7)
    first = _train(model, opt, sched, 3)
    _save(tmp_path, 3, model, opt, sched)
    del model, opt, sched

    _seed_all(12345)  # a restarted process starts from other RNG states and other weights
    model, opt, sched = _build(3)
    state = load_checkpoint(tmp_path, student=model, optimizer=opt, scheduler=sched)
    assert state.step == 3
    second = _train(model, opt, sched, 3)

    assert first + second == uninterrupted
    for a, b in zip(final_weights, model.state_dict().values()):
        assert torch.equal(a, b)


class _Crash(BaseException):
    """Stands for the process dying: not an Exception, so the saver's clean-up does not run."""


def test_crash_during_save_leaves_previous_checkpoint_latest(tmp_path, monkeypatch):
    model, opt, sched = _build(0)
    _train(model, opt, sched, 1)
    good = _save(tmp_path, 1, model, opt, sched)
    saved_weight = model[0].weight.detach().clone()
    _train(model, opt, sched, 1)

    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise _Crash("killed mid-save")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(_Crash):
        _save(tmp_path, 2, model, opt, sched)
    monkeypatch.setattr(torch, "save", real_save)

    root = tmp_path / "checkpoints"
    debris = [p.name for p in root.iterdir() if ".tmp-" in p.name and p.is_dir()]
    assert debris and not (root / debris[0] / "meta.json").exists()
    assert latest_checkpoint(tmp_path) == good
    (root / "latest").unlink()  # even the fallback scan must not count the half-written folder
    assert latest_checkpoint(tmp_path) == good

    fresh, fopt, fsched = _build(5)
    assert load_checkpoint(tmp_path, student=fresh, optimizer=fopt, scheduler=fsched).step == 1
    assert torch.equal(fresh[0].weight, saved_weight)

    # A later successful save publishes normally and removes the debris.
    _save(tmp_path, 3, model, opt, sched)
    assert not [p for p in root.iterdir() if ".tmp-" in p.name]
    assert latest_checkpoint(tmp_path) == root / "step_000003"


def test_failed_directory_rename_keeps_previous_latest(tmp_path, monkeypatch):
    model, opt, sched = _build(0)
    good = _save(tmp_path, 1, model, opt, sched)
    real_replace = os.replace

    def failing_replace(src, dst, *a, **k):
        if Path(src).is_dir():
            raise OSError("simulated failure renaming the checkpoint directory")
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(CheckpointError, match="simulated failure"):
        _save(tmp_path, 2, model, opt, sched)
    monkeypatch.setattr(os, "replace", real_replace)

    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_000001"
    assert not (root / "step_000002").exists()
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000001"]
    assert latest_checkpoint(tmp_path) == good
    assert load_checkpoint(tmp_path, student=_build(1)[0]).step == 1


def test_latest_falls_back_when_missing_corrupt_or_pointing_at_incomplete(tmp_path):
    model, opt, sched = _build(0)
    _save(tmp_path, 1, model, opt, sched, keep_last=0)
    second = _save(tmp_path, 2, model, opt, sched, keep_last=0)
    root = tmp_path / "checkpoints"
    assert latest_checkpoint(tmp_path) == second

    (root / "latest").write_bytes(b"\xff\x00garbage")
    assert latest_checkpoint(tmp_path) == second
    (root / "latest").write_text("../../etc\n")
    assert latest_checkpoint(tmp_path) == second

    # A step folder that looks newer but is incomplete (no meta / complete flag false) never counts.
    shutil.copytree(second, root / "step_000009")
    (root / "step_000009" / "meta.json").unlink()
    shutil.copytree(second, root / "step_000008")
    meta = json.loads((root / "step_000008" / "meta.json").read_text())
    meta["complete"] = False
    (root / "step_000008" / "meta.json").write_text(json.dumps(meta))
    shutil.copytree(second, root / "step_000010.tmp-4242")
    (root / "latest").write_text("step_000009\n")
    assert latest_checkpoint(tmp_path) == second
    with pytest.raises(CheckpointError, match="meta.json"):
        load_checkpoint(root / "step_000009", student=_build(1)[0])

    assert latest_checkpoint(tmp_path / "nowhere") is None
    with pytest.raises(CheckpointError, match="neither a checkpoint directory"):
        load_checkpoint(tmp_path / "nowhere", student=model)


def test_keep_last_prunes_old_checkpoints_never_the_new_one(tmp_path):
    model, opt, sched = _build(0)
    root = tmp_path / "checkpoints"
    for step in range(1, 6):
        _save(tmp_path, step, model, opt, sched, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000004", "step_000005"]

    _save(tmp_path, 6, model, opt, sched, keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000006"]

    # Re-saving the same step replaces it in place; rolling back to a lower step keeps the new one and
    # leaves higher (abandoned-lineage) checkpoints alone.
    _save(tmp_path, 6, model, opt, sched, keep_last=1)
    _save(tmp_path, 2, model, opt, sched, keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000002", "step_000006"]
    assert latest_checkpoint(tmp_path) == root / "step_000002"

    _save(tmp_path, 3, model, opt, sched, keep_last=0)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000002", "step_000003", "step_000006"]


def test_corrupt_or_missing_rank_file_raises_naming_the_file(tmp_path):
    model, opt, sched = _build(0)
    path = _save(tmp_path, 4, model, opt, sched)
    rank_file = path / "rank_00000.pt"
    data = rank_file.read_bytes()
    rank_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="rank_00000.pt") as info:
        load_checkpoint(path, student=_build(1)[0], optimizer=_build(1)[1])
    assert "corrupt" in str(info.value)

    rank_file.write_bytes(b"not a zip file at all")
    with pytest.raises(CheckpointError, match="rank_00000.pt"):
        load_checkpoint(tmp_path, student=_build(1)[0])

    (path / "meta.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="meta.json"):
        load_checkpoint(path, student=_build(1)[0])


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path):
    model, opt, sched = _build(0, hidden=16)
    _save(tmp_path, 1, model, opt, sched)
    other, other_opt, _ = _build(0, hidden=32)
    before = other[0].weight.detach().clone()
    with pytest.raises(CheckpointError, match=r"'0\.weight'.*\(16, 8\).*\(32, 8\)"):
        load_checkpoint(tmp_path, student=other, optimizer=other_opt)
    assert torch.equal(other[0].weight, before)  # validation happens before anything is modified

    with pytest.raises(CheckpointError, match="keys differ"):
        load_checkpoint(tmp_path, student=nn.Linear(8, 1))


class _ShardedOptimizer:
    """Stands in for the distributed optimizer's wrapper: its own state format and ``check_state_dict``."""

    def __init__(self, opt):
        self.opt = opt

    def state_dict(self):
        return {"format": "megatron_distributed_optimizer", "common": {}, "param_state": {}}

    def check_state_dict(self, saved):
        if saved.get("format") != "megatron_distributed_optimizer":
            raise ValueError("optimizer state was written by a torch optimizer")

    def load_state_dict(self, saved):
        self.check_state_dict(saved)


def test_optimizer_state_formats_are_not_mixed(tmp_path):
    """A torch optimizer's checkpoint is refused by a sharded optimizer and vice versa, before any change."""
    model, opt, sched = _build(0)
    _save(tmp_path / "torch", 1, model, opt, sched)
    _save(tmp_path / "sharded", 1, model, _ShardedOptimizer(opt), sched)
    other, other_opt, _ = _build(1)
    before = other[0].weight.detach().clone()
    with pytest.raises(CheckpointError, match="written by a torch optimizer"):
        load_checkpoint(tmp_path / "torch", student=other, optimizer=_ShardedOptimizer(other_opt))
    with pytest.raises(CheckpointError, match="'megatron_distributed_optimizer' format.*torch optimizer"):
        load_checkpoint(tmp_path / "sharded", student=other, optimizer=other_opt)
    assert torch.equal(other[0].weight, before)
    load_checkpoint(tmp_path / "sharded", student=other, optimizer=_ShardedOptimizer(other_opt))
    assert torch.equal(other[0].weight, model[0].weight)


def test_layout_mismatch_names_both_layouts(tmp_path, monkeypatch):
    import types

    fake_ps = types.SimpleNamespace(
        model_parallel_is_initialized=lambda: True,
        get_tensor_model_parallel_world_size=lambda: 2,
        get_pipeline_model_parallel_world_size=lambda: 1,
        get_context_parallel_world_size=lambda: 1,
        get_expert_model_parallel_world_size=lambda: 1,
    )
    model, opt, sched = _build(0)
    # Stands in for an initialised megatron-core parallel state without the slow import.
    monkeypatch.setitem(__import__("sys").modules, "megatron.core.parallel_state", fake_ps)
    path = _save(tmp_path, 1, model, opt, sched)
    assert json.loads((path / "meta.json").read_text())["layout"]["tensor_model_parallel_size"] == 2
    monkeypatch.delitem(__import__("sys").modules, "megatron.core.parallel_state")

    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path, student=_build(1)[0])
    msg = str(info.value)
    assert "TP=2" in msg and "TP=1" in msg and "world_size=1" in msg


def test_loading_always_uses_weights_only(tmp_path, monkeypatch):
    model, opt, sched = _build(0)
    _save(tmp_path, 1, model, opt, sched)
    calls = []
    real_load = torch.load

    def checking_load(*a, **k):
        calls.append(k.get("weights_only"))
        assert k.get("weights_only") is True, "checkpoint loading must never unpickle arbitrary objects"
        return real_load(*a, **k)

    monkeypatch.setattr(torch, "load", checking_load)
    load_checkpoint(tmp_path, student=_build(1)[0], optimizer=_build(1)[1])
    assert calls == [True]


def test_values_weights_only_cannot_load_fail_the_save(tmp_path):
    model, opt, sched = _build(0)
    with pytest.raises(CheckpointError, match=r"\['metadata'\]\['score'\] is a numpy"):
        _save(tmp_path, 1, model, opt, sched, metadata={"score": np.float64(0.5)})
    assert latest_checkpoint(tmp_path) is None
    root = tmp_path / "checkpoints"
    assert not root.exists() or not list(root.iterdir())
    with pytest.raises(ValueError, match="state.step"):
        save_checkpoint(tmp_path, 2, student=model, optimizer=opt, scheduler=sched, teacher=None,
                        state=TrainState(step=3, data_position={}), config_yaml=CONFIG)


def test_teacher_none_saves_and_leaves_passed_teacher_untouched(tmp_path, caplog):
    model, opt, sched = _build(0)
    _save(tmp_path, 1, model, opt, sched, teacher=None)
    teacher = nn.Linear(8, 1)
    before = teacher.weight.detach().clone()
    with caplog.at_level("WARNING", logger=ckpt_mod.__name__):
        load_checkpoint(tmp_path, student=_build(1)[0], teacher=teacher)
    assert torch.equal(teacher.weight, before)
    assert "no teacher weights" in caplog.text


# ---- two ranks over gloo ------------------------------------------------------------------------------


def _two_rank_save_load(rank: int, world_size: int, run_dir: str) -> dict:
    torch.manual_seed(100 + rank)  # each rank owns different tensors, as TP shards do
    model = nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched.step()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    path = save_checkpoint(run_dir, 7, student=model, optimizer=opt, scheduler=sched, teacher=None,
                           state=TrainState(step=7, data_position={"rank": rank, "cursor": 10 * rank}),
                           config_yaml=CONFIG)
    expected_rand = torch.rand(4)

    torch.manual_seed(0)
    fresh = nn.Linear(4, 3)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    fresh_sched = torch.optim.lr_scheduler.LambdaLR(fresh_opt, lambda s: 0.5 ** s)
    state = load_checkpoint(run_dir, student=fresh, optimizer=fresh_opt, scheduler=fresh_sched)

    # A save that fails on rank 1 only must fail on every rank (nobody left waiting) and publish nothing.
    bad = {"score": np.float64(1.0)} if rank == 1 else {}
    try:
        save_checkpoint(run_dir, 8, student=model, optimizer=opt, scheduler=sched, teacher=None,
                        state=TrainState(step=8, data_position={}, metadata=bad), config_yaml=CONFIG)
        bad_save_error = None
    except CheckpointError as exc:
        bad_save_error = str(exc)
    return {
        "bad_save_error": bad_save_error,
        "path": str(path),
        "weight": saved["weight"].tolist(),  # plain lists: the rank exits before the parent reads
        "weights_restored": all(torch.equal(saved[k], v) for k, v in fresh.state_dict().items()),
        "opt_restored": torch.equal(fresh_opt.state[fresh.weight]["exp_avg"], opt.state[model.weight]["exp_avg"]),
        "rng_restored": torch.equal(torch.rand(4), expected_rand),
        "lr": fresh_sched.get_last_lr(),
        "data_position": state.data_position,
    }


@pytest.mark.slow
def test_two_rank_gloo_each_rank_saves_and_reloads_its_own_shard(tmp_path):
    results = run_distributed(_two_rank_save_load, 2, str(tmp_path))
    path = Path(results[0]["path"])
    assert results[1]["path"] == str(path)
    assert sorted(os.listdir(path)) == ["meta.json", "rank_00000.pt", "rank_00001.pt"]
    assert json.loads((path / "meta.json").read_text())["layout"]["world_size"] == 2
    assert results[0]["weight"] != results[1]["weight"]
    for rank, r in enumerate(results):
        assert r["weights_restored"] and r["opt_restored"] and r["rng_restored"]
        assert r["lr"] == [0.005]
        assert r["data_position"] == {"rank": rank, "cursor": 10 * rank}
    assert "failed on rank(s) [1]" in results[0]["bad_save_error"]
    assert "numpy.float64" in results[1]["bad_save_error"]
    assert latest_checkpoint(tmp_path) == path
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000007"]

    # This single process is a different layout from the two-rank one that wrote it.
    with pytest.raises(CheckpointError, match=r"world_size=2.*world_size=1"):
        load_checkpoint(tmp_path, student=nn.Linear(4, 3))
