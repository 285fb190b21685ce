"""Checks the prepared GPU run without a GPU: the carried-wheel check, the report, and ``run.sh --dry-run``.

References: hand-made wheel folders (empty files named as pip names wheels) with one defect each; a
hand-written JUnit XML; the parameters of a model the builder makes (MFU's FLOP count); the dry run's own outputs checked against the sizes it was asked to run (every
method of the loss benchmark for both vocabularies, both step variants, batch x new tokens decoded).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu.common import TINY, build_model, count_matmul_parameters
from benchmarks.gpu.step_bench import privileged_tokens, step_flops
from benchmarks.gpu.suite import read_test_results, render_markdown
from benchmarks.gpu.wheels import Pin, check_folder, normalise, parse_wheel_name, read_pins
from caopd_megatron.models.builder import count_parameters
from helpers_models import runtime  # noqa: F401  (a fixture)

ROOT = Path(__file__).resolve().parent.parent
PINS = [Pin("megatron-core", "0.19.2", False), Pin("antlr4-python3-runtime", "4.9.3", True)]
GOOD = ["megatron_core-0.19.2-cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
        "antlr4_python3_runtime-4.9.3-py3-none-any.whl"]


def wheel_folder(tmp_path: Path, names) -> Path:
    folder = tmp_path / "wheels"
    folder.mkdir()
    for name in names:
        (folder / name).write_bytes(b"")
    return folder


def test_pinned_list_is_read_with_the_sdist_marker():
    pins = {p.name: p for p in read_pins()}
    assert pins["megatron-core"].version == "0.19.2" and not pins["megatron-core"].built_from_sdist
    assert pins["antlr4-python3-runtime"].built_from_sdist
    assert {"liger-kernel", "numpy", "packaging", "omegaconf", "pyyaml", "tqdm", "pytest"} <= set(pins)


def test_wheel_names_parse_and_normalise():
    w = parse_wheel_name(GOOD[0])
    assert (w.distribution, w.version, w.python, w.abi) == ("megatron_core", "0.19.2", "cp312", "cp312")
    assert normalise("Antlr4.Python3-Runtime") == "antlr4_python3_runtime"
    with pytest.raises(ValueError, match="not a wheel"):
        parse_wheel_name("megatron_core-0.19.2.tar.gz")


def test_complete_folder_passes(tmp_path):
    assert check_folder(wheel_folder(tmp_path, GOOD), PINS) == []


@pytest.mark.parametrize("names,expected", [
    (GOOD[:1], "antlr4-python3-runtime==4.9.3: missing"),
    ([GOOD[0].replace("cp312-cp312", "cp311-cp311"), GOOD[1]], "do not install on CPython 3.12"),
    ([GOOD[0].replace("manylinux_2_24_x86_64.manylinux_2_28_x86_64", "macosx_11_0_arm64"), GOOD[1]],
     "do not install on CPython 3.12"),
    ([GOOD[0].replace("0.19.2", "0.19.0"), GOOD[1]], "version 0.19.0, pinned 0.19.2"),
    (GOOD + ["transformer_engine-2.9.0-py3-none-any.whl"], "transformer_engine-2.9.0-py3-none-any.whl: not in"),
    (GOOD + ["notes.txt"], "notes.txt: not a wheel"),
])
def test_each_defect_is_named(tmp_path, names, expected):
    problems = check_folder(wheel_folder(tmp_path, names), PINS)
    assert len(problems) == 1 and expected in problems[0]


def test_missing_folder_says_how_to_fill_it(tmp_path):
    assert "fetch_wheels.sh" in check_folder(tmp_path / "nowhere", PINS)[0]


def test_junit_counts_and_markdown(tmp_path):
    xml = tmp_path / "t.xml"
    xml.write_text('<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
                   '<testcase classname="tests.test_gpu" name="test_a"><failure/></testcase>'
                   '<testcase classname="tests.test_gpu" name="test_b"/></testsuite></testsuites>')
    counts = read_test_results(xml)
    assert counts == {"tests": 3, "failures": 1, "errors": 0, "skipped": 1, "failed": ["tests.test_gpu::test_a"]}
    report = {"dry_run": False, "command": "benchmarks/gpu/run.sh out", "tests": counts, "matmul_tflops": 700.0,
              "environment": {"date": "d", "torch": "2.11", "python": "3.12", "device": "cuda", "gpu": "H200"},
              "loss": [{"vocab": 128256, "tokens": 8192, "method": "floor", "ms": 2.0, "us_per_token": 0.25,
                        "x_floor": 1.0, "peak_bytes": 2**31, "peak_vs_logits": 1.0, "gb_per_s": 3000.0,
                        "liger": "liger-kernel 0.8.5"}]}
    text = render_markdown(report)
    assert text.startswith("# GPU run: H200")
    assert "3 run, 1 failed, 1 skipped (tests.test_gpu::test_a)" in text
    assert "| 128256 | 8192 | floor | 2.00 | 0.250 | 1.00 | 2.00 | 1.00 |" in text
    assert "3000 GB/s" in text and "700.0 TFLOP/s" in text and "Dry run" not in text


def test_flop_count_uses_the_built_models_parameters(runtime):
    """MFU's parameter count equals the parameters of the model the builder makes (tied embeddings: the output
    layer is the embedding, counted once), and the step counts 3 student forwards and 1 teacher forward."""
    model, vocab = build_model(TINY.model, runtime)
    assert count_matmul_parameters(TINY.model, vocab.padded) == count_parameters(model)
    seq = TINY.step_prompt_tokens + TINY.step_response_tokens
    per_token = 2 * count_parameters(model) + 2 * TINY.model.num_layers * TINY.model.hidden_size * seq
    student = TINY.step_sequences * seq * per_token
    teacher_seq = seq + privileged_tokens(TINY)
    teacher = TINY.step_sequences * teacher_seq * (2 * count_parameters(model)
                                                   + 2 * TINY.model.num_layers * TINY.model.hidden_size * teacher_seq)
    assert step_flops(TINY, vocab.padded) == pytest.approx(3 * student + teacher, rel=1e-12)


@pytest.mark.slow
def test_run_sh_dry_run_exercises_every_part(tmp_path):
    wheels = wheel_folder(tmp_path, [f"{normalise(p.name)}-{p.version}-py3-none-any.whl" for p in read_pins()])
    out = tmp_path / "out"
    env = {**os.environ, "CAOPD_GPU_WHEELS": str(wheels), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/run.sh"), str(out), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "GPU run plan" in done.stdout and "wheels: all" in done.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["dry_run"] is True and report["wheel_problems"] == []
    assert report["tests"]["tests"] > 0 and report["tests"]["failures"] == report["tests"]["errors"] == 0
    methods = {"ours", "ours fused", "naive", "naive+matmul", "floor"}
    for vocab in TINY.loss_vocabs:
        rows = [r for r in report["loss"] if r["vocab"] == vocab]
        assert {r["method"] for r in rows} == methods and all(r["ms"] > 0 for r in rows)
    assert [r["loss"] for r in report["step"]] == ["vocab-parallel", "fused chunked"]
    assert all(r["loss_value"] > 0 and r["tokens_per_s"] > 0 for r in report["step"])
    rollout = report["rollout"]
    assert rollout["generated"] == TINY.rollout_batch * TINY.rollout_new_tokens
    assert "Dry run on CPU" in (out / "report.md").read_text()
    assert (out / "run.log").is_file()
