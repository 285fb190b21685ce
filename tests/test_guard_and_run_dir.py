"""The divergence guard (no update from a non-finite step), the collapse warning, valid-JSON logs, the
run-directory modes and the torn-log trim, in process."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from caopd_megatron.checkpointing.run_dir import RunDirectoryError, choose_run_dir, trim_log
from caopd_megatron.config.schema import OptimConfig
from caopd_megatron.distill.optim import build_scheduler, optimizer_step
from caopd_megatron.runtime.guard import CollapseWatch, TrainingDivergedError, at_step, json_number
from helpers_models import runtime  # noqa: F401  (a fixture: clipping reads the model-parallel groups)


def _model_with_grad(value: float):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = build_scheduler(opt, OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant"), 10)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    model.weight.grad[0, 0] = value
    return model, opt, sched


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_stops_the_step_before_the_update(bad, runtime):
    model, opt, sched = _model_with_grad(bad)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TrainingDivergedError, match="training diverged at step 7: non-finite gradient norm"):
        with at_step(7):
            optimizer_step(model, opt, sched, max_norm=1.0)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert not opt.state and sched.last_epoch == 0  # no Adam state created, schedule not advanced


def test_non_finite_loss_stops_the_step_even_with_finite_gradients(runtime):
    model, opt, sched = _model_with_grad(0.5)
    before = model.weight.detach().clone()
    with pytest.raises(TrainingDivergedError, match="non-finite loss nan"):
        optimizer_step(model, opt, sched, max_norm=0.0, loss=float("nan"))
    assert torch.equal(before, model.weight)


def test_finite_step_is_unchanged_by_the_guard(runtime):
    """Reference: torch's own clip + AdamW step on the same gradients."""
    model, opt, sched = _model_with_grad(0.5)
    ref, ref_opt, _ = _model_with_grad(0.5)
    norm, _ = optimizer_step(model, opt, sched, max_norm=0.1, loss=1.0)
    want = torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 0.1)
    ref_opt.step()
    assert norm == pytest.approx(float(want), rel=1e-6)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_collapse_warning_after_n_quiet_steps_once_per_streak():
    watch = CollapseWatch(loss_below=1e-6, grad_norm_below=1e-6, steps=3)
    seen = [watch.observe(s, loss, norm) for s, (loss, norm) in enumerate(
        [(0.0, 0.0), (0.0, 0.0), (1.0, 0.0), (0.0, 0.0), (0.0, 1e-9), (1e-7, 0.0), (0.0, 0.0)])]
    assert [i for i, w in enumerate(seen) if w] == [5]
    assert "3 consecutive steps (through step 5)" in seen[5]
    assert CollapseWatch(1.0, 1.0, 0).observe(0, 0.0, 0.0) is None  # 0 = off


def test_json_number_keeps_every_log_line_valid_json():
    row = {k: json_number(v) for k, v in {"a": 1.5, "b": float("nan"), "c": float("inf"), "d": -math.inf}.items()}
    text = json.dumps(row, allow_nan=False)
    assert json.loads(text) == {"a": 1.5, "b": "NaN", "c": "Infinity", "d": "-Infinity"}


def test_run_directory_modes(tmp_path):
    fresh = tmp_path / "fresh"
    for mode in ("resume", "refuse", "new"):
        assert choose_run_dir(fresh, mode) == fresh  # nothing there yet: every mode uses it
    run = tmp_path / "job"
    (run / "checkpoints").mkdir(parents=True)
    assert choose_run_dir(run, "resume") == run
    with pytest.raises(RunDirectoryError, match="already holds a run .* run.existing=refuse"):
        choose_run_dir(run, "refuse")
    assert choose_run_dir(run, "new") == tmp_path / "job-2" and (tmp_path / "job-2").is_dir()
    (tmp_path / "job-2" / "train_log.jsonl").write_text("")
    assert choose_run_dir(run, "new") == tmp_path / "job-3"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints"]  # the existing run is untouched


def test_trim_log_drops_torn_lines_and_steps_past_the_checkpoint(tmp_path, caplog):
    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "loss": "NaN"}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
    with caplog.at_level("WARNING"):
        trim_log(log, 2)
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [0, 1]
    assert "dropped 1 unreadable line" in caplog.text
    trim_log(log, 0)
    assert log.read_text() == ""
