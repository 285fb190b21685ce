"""`caopd compare`: bootstrap intervals against a direct seeded numpy bootstrap, AURC against hand-computed
cases, and the whole command on the reduced embedded default's OPD / CaOPD students plus an HF export."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from caopd_megatron.evaluation.compare import aurc, compare_models, risk_coverage
from caopd_megatron.evaluation.metrics import calibration_report, expected_calibration_error
from caopd_megatron.evaluation.report import verdict

from test_cli_e2e import TINY, caopd, read_jsonl


def _data(seed: int, n: int, skill: float):
    rng = np.random.default_rng(seed)
    conf = np.round(rng.random(n), 1)
    correct = rng.random(n) < np.clip(conf + skill, 0, 1)
    conf_list = [None if i % 9 == 0 else float(c) for i, c in enumerate(conf)]  # some missing
    return correct.tolist(), conf_list


def _direct_metrics(y: np.ndarray, c: np.ndarray) -> dict[str, float]:
    """One resample's metrics straight from the definitions (brute-force pairs, the metrics module's ECE)."""
    pos, neg = c[y], c[~y]
    pairs = pos[:, None] - neg[None, :]
    return {
        "accuracy": y.mean(),
        "brier": np.mean((c - y) ** 2),
        "ece_equal_width": expected_calibration_error(y.tolist(), c.tolist(), 10),
        "ece_equal_mass": expected_calibration_error(y.tolist(), c.tolist(), 10, scheme="equal_mass"),
        "spr": np.mean(pairs > 0) if pos.size and neg.size else np.nan,
        "auroc": np.mean((pairs > 0) + 0.5 * (pairs == 0)) if pos.size and neg.size else np.nan,
        "aurc": aurc(y.tolist(), c.tolist()),
    }


def test_intervals_match_a_direct_seeded_numpy_bootstrap():
    n, samples, seed = 60, 300, 11
    ya, ca = _data(1, n, 0.0)
    yb, cb = _data(2, n, 0.2)
    stats = compare_models({"a": (ya, ca), "b": (yb, cb)}, samples=samples, seed=seed, level=0.9)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(samples, n))
    arrays = {m: (np.asarray(y), np.asarray([0.0 if v is None else v for v in c])) for m, (y, c) in
              {"a": (ya, ca), "b": (yb, cb)}.items()}
    direct = {m: [_direct_metrics(y[i], c[i]) for i in idx] for m, (y, c) in arrays.items()}
    for metric in ("accuracy", "brier", "ece_equal_width", "ece_equal_mass", "spr", "auroc", "aurc"):
        for m in ("a", "b"):
            values = np.array([d[metric] for d in direct[m]])
            low, high = np.percentile(values[~np.isnan(values)], [5, 95])
            iv = stats.metrics[m][metric]
            assert (iv.low, iv.high) == pytest.approx((low, high), abs=1e-12), (m, metric)
        diff = np.array([db[metric] - da[metric] for da, db in zip(direct["a"], direct["b"])])
        low, high = np.percentile(diff[~np.isnan(diff)], [5, 95])
        iv = stats.differences[("a", "b")][metric]
        assert (iv.low, iv.high) == pytest.approx((low, high), abs=1e-12), metric
    # Point estimates are the metrics module's (missing confidence = 0.0, parse rate counts it).
    report = calibration_report(yb, cb)
    assert stats.metrics["b"]["accuracy"].value == report.accuracy
    assert stats.metrics["b"]["ece_equal_width"].value == report.ece
    assert stats.metrics["b"]["parse_rate"].value == report.parse_rate < 1.0


def test_aurc_hand_computed():
    # Most confident first: right, wrong, right, wrong -> risks 0, 1/2, 1/3, 2/4.
    assert aurc([True, False, True, False], [0.9, 0.8, 0.7, 0.6]) == pytest.approx((0 + 1 / 2 + 1 / 3 + 2 / 4) / 4)
    # A tie of one right and one wrong at the top: expected errors 1/2 at k = 1, 1 at k = 2, then 1 of 3.
    coverage, risk = risk_coverage([True, False, True], [0.9, 0.9, 0.5])
    assert coverage.tolist() == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert risk.tolist() == pytest.approx([0.5, 0.5, 1 / 3])
    assert aurc([True, False, True], [0.9, 0.9, 0.5]) == pytest.approx((0.5 + 0.5 + 1 / 3) / 3)
    assert aurc([True] * 5, [0.1, 0.5, 0.2, 0.9, 0.3]) == 0.0  # no errors, no risk


def test_gates_and_verdict():
    correct = [True, True, False, True, False, False]
    conf = [0.95, 0.85, 0.8, 0.6, 0.4, None]
    stats = compare_models({"a": (correct, conf), "b": (correct, conf)}, samples=50, thresholds=(0.8, 0.99))
    gate = stats.thresholds["a"][0]
    assert gate["kept"] == 3 and gate["coverage"].value == pytest.approx(0.5)
    assert gate["selective_accuracy"].value == pytest.approx(2 / 3)
    assert stats.thresholds["a"][1]["selective_accuracy"].value is None  # nothing kept
    assert "no difference between b and a is significant" in verdict(stats)

    n = 400
    truth = (np.arange(n) % 2 == 0).tolist()
    good = ([True] * n, [0.9] * n)
    bad = (truth, [0.9] * n)
    text = verdict(compare_models({"base": bad, "better": good}, samples=200))
    assert "better is significantly better than base on accuracy +0.500" in text
    assert "ECE (equal-width)" in text.split("significantly better")[1]


@pytest.fixture(scope="module")
def demo_run(tiny_demo) -> Path:
    return tiny_demo.out


def test_compare_command_on_demo_students_and_an_hf_folder(demo_run: Path, tmp_path: Path):
    from caopd_megatron.checkpointing.hf import export_hf_checkpoint

    hf = tmp_path / "caopd_hf"
    export_hf_checkpoint(demo_run / "caopd" / "student", hf, dtype="float32", show_progress=False)
    report = tmp_path / "report"
    proc = caopd("compare", "-c", str(demo_run / "config.yaml"), "--model", f"OPD={demo_run / 'opd' / 'student'}",
                 "--model", f"CaOPD={demo_run / 'caopd' / 'student'}", "--model", f"CaOPD_hf={hf}",
                 "--out", str(report), "evaluation.bootstrap_samples=100", "logging.progress=false")
    assert "report:" in proc.stdout
    md = (report / "report.md").read_text()
    assert "Verdict" in md and "CaOPD_hf − OPD" in md and "### By difficulty" in md
    for png in ("reliability.png", "risk_coverage.png"):
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    payload = json.loads((report / "report.json").read_text())
    rows = {m: read_jsonl(report / f"responses_{m}.jsonl") for m in ("OPD", "CaOPD", "CaOPD_hf")}
    assert all(len(r) == 40 for r in rows.values())
    # The HF round trip answers exactly as the checkpoint it was exported from (greedy, fp32 weights).
    assert [r["text"] for r in rows["CaOPD_hf"]] == [r["text"] for r in rows["CaOPD"]]
    # The demo's own evaluation of the same student on the same prompts agrees with compare's answers.
    demo_rows = read_jsonl(demo_run / "eval" / "caopd_responses.jsonl")
    assert [r["text"] for r in demo_rows] == [r["text"] for r in rows["CaOPD"]]
    for m, rs in rows.items():
        acc = sum(r["correct"] for r in rs) / len(rs)
        assert payload["metrics"][m]["accuracy"]["value"] == pytest.approx(acc)
        assert payload["metrics"][m]["accuracy"]["low"] <= acc <= payload["metrics"][m]["accuracy"]["high"]


def test_compare_rejects_bad_model_specs(tmp_path: Path):
    proc = caopd("compare", "--model", f"a={tmp_path}", "--model", f"b={tmp_path}", "--out", str(tmp_path / "r"),
                 check=False)
    assert proc.returncode == 2 and "not a run directory" in proc.stderr
    proc = caopd("compare", "--model", "only=/nonexistent", "--out", str(tmp_path / "r"), check=False)
    assert proc.returncode == 2 and "not a directory" in proc.stderr


def test_compare_reads_run_directories_and_step_checkpoints(tmp_path: Path):
    run = tmp_path / "run"
    caopd("run", *TINY, "distill.steps=2", "checkpoint.save_interval=1", "checkpoint.keep_last=2", "teacher.mode=frozen",
          f"run.output_dir={run}")
    steps = sorted((run / "checkpoints").glob("step_*"))
    assert len(steps) == 2
    report = tmp_path / "report"
    # No -c: the run's own config.yaml supplies the prompts and templates.
    caopd("compare", "--model", f"latest={run}", "--model", f"last_step={steps[-1]}", "--model", f"first_step={steps[0]}",
          "--out", str(report), "evaluation.bootstrap_samples=50")
    rows = {m: read_jsonl(report / f"responses_{m}.jsonl") for m in ("latest", "last_step", "first_step")}
    assert len(rows["latest"]) == 40  # TINY's task.n_eval, from the run's config
    assert [r["text"] for r in rows["latest"]] == [r["text"] for r in rows["last_step"]]
    payload = json.loads((report / "report.json").read_text())
    same = payload["differences"]["last_step - latest"]["accuracy"]
    assert same["value"] == 0 and same["low"] == 0 and same["high"] == 0
