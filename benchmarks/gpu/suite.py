"""The GPU run's Python half: the plan, the wheel check, the benchmarks, and the report (Markdown + JSON).

Usage (``benchmarks/gpu/run.sh`` calls it; the repository root on ``PYTHONPATH``):
  python -m benchmarks.gpu.suite --out DIR                 # on the GPU: full sizes (common.FULL)
  python -m benchmarks.gpu.suite --out DIR --dry-run       # anywhere: wheel check, tiny sizes on CPU
  python -m benchmarks.gpu.suite --out DIR --plan [--dry-run]   # the plan and the wheel check only

Design decisions:
- The report is rewritten after every section (``report.json``, ``report.md``), so a run cut short by its
  time limit still leaves what it measured.
- The dry run executes the same functions at ``common.TINY`` sizes on the CPU: every code path of the GPU run
  except CUDA itself (and Liger, whose triton kernels need a GPU) runs before a GPU is ever lent.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from benchmarks.gpu import loss_bench, step_bench
from benchmarks.gpu.common import FULL, TINY, matmul_tflops
from benchmarks.gpu.wheels import check_folder, read_pins

log = logging.getLogger("benchmarks.gpu")

PLAN = """GPU run plan (one H200, 8 minutes of wall time; budgets in run.sh)
  1. install the carried wheels ({wheels}) into a private target on PYTHONPATH (--no-index --no-deps;
     the machine's torch, CUDA and triton are kept; budget 60 s): {pins}
  2. pytest -m gpu tests/test_gpu.py: losses in bf16 vs fp64, sampler CUDA vs CPU, one distillation step
     CUDA vs CPU in fp32, CPU shims inactive (budget 150 s)
  3. measured bf16 matmul rate ({matmul}^3 GEMMs); steps 3-7 share a budget of 240 s
  4. loss forward+backward, reverse KL, bf16, {loss_tokens} tokens, vocab {vocabs}: ours, ours fused,
     naive, naive+matmul, liger fused (if it imports), memory-traffic floor; time and peak memory
  5. one distillation step, {layers}-layer h={hidden} student + EMA teacher in bf16, {seqs} x {seq} tokens,
     unfused and fused loss: tokens/s, MFU vs step 3
  6. rollout decoding, batch {batch}, {new} new tokens, the project's sampler
  7. report.md + report.json in {out}"""


def describe_environment(device: torch.device) -> dict:
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__, "device": str(device),
            "command": " ".join(sys.argv)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    capability=".".join(map(str, torch.cuda.get_device_capability(device))))
    try:
        import megatron.core

        info["megatron_core"] = megatron.core.__version__
    except Exception as exc:  # reported, not fatal: the wheel check says what is missing
        info["megatron_core"] = f"not importable ({type(exc).__name__})"
    return info


def read_test_results(path: Path) -> dict | None:
    """Counts from pytest's JUnit XML (``run.sh`` writes it), or None when the tests did not run."""
    if not path.is_file():
        return None
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    counts["failed"] = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
                        if case.find("failure") is not None or case.find("error") is not None]
    return counts


def gib(value) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def num(value, fmt="{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def render_markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# GPU run: {env.get('gpu', env['device'])}", "",
             f"{env['date']}; torch {env['torch']}, CUDA {env.get('cuda', '-')}, megatron-core "
             f"{env.get('megatron_core')}, Python {env['python']}; command: `{report['command']}`", ""]
    if report.get("dry_run"):
        lines += ["**Dry run on CPU at tiny sizes: these numbers exercise the code, they measure nothing.**", ""]
    tests = report.get("tests")
    if tests:
        lines += [f"Tests marked gpu: {tests['tests']} run, {tests['failures'] + tests['errors']} failed, "
                  f"{tests['skipped']} skipped" + (f" ({', '.join(tests['failed'])})" if tests["failed"] else ""), ""]
    if "matmul_tflops" in report:
        lines += [f"Measured bf16 matmul rate: {report['matmul_tflops']:.1f} TFLOP/s", ""]
    if report.get("loss"):
        lines += ["| vocab | tokens | method | ms | us/token | x floor | peak GiB | peak / logits |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in report["loss"]:
            if "error" in r:
                lines.append(f"| {r['vocab']} | | {r['method']} | {r['error']} | | | | |")
                continue
            lines.append(f"| {r['vocab']} | {r['tokens']} | {r['method']} | {r['ms']:.2f} | {r['us_per_token']:.3f} "
                         f"| {num(r.get('x_floor'))} | {gib(r['peak_bytes'])} | {num(r['peak_vs_logits'])} |")
        floors = [r for r in report["loss"] if r["method"] == "floor" and "gb_per_s" in r]
        lines += [""] + [f"Floor kernel at vocab {r['vocab']}: {r['gb_per_s']:.0f} GB/s" for r in floors]
        lines += [f"Liger: {report['loss'][0].get('liger')}", ""]
    if report.get("step"):
        lines += ["| step loss | ms/step | tokens/s | loss tokens/s | model TFLOP/s | MFU | peak GiB (total) |",
                  "|---|---|---|---|---|---|---|"]
        for r in report["step"]:
            lines.append(f"| {r['loss']} | {r['ms']:.1f} | {r['tokens_per_s']:.0f} | {r['loss_tokens_per_s']:.0f} | "
                         f"{r['model_tflops']:.1f} | {r['mfu']:.3f} | {gib(r['peak_total_bytes'])} |")
        lines.append("")
    if report.get("rollout"):
        r = report["rollout"]
        lines += ["| rollout | batch | new tokens | s | tokens/s | ms/decode step | peak GiB (total) |",
                  "|---|---|---|---|---|---|---|",
                  f"| {r['engine']} | {r['batch']} | {r['new_tokens']} | {r['s']:.2f} | {r['tokens_per_s']:.0f} | "
                  f"{r['ms_per_decode_step']:.2f} | {gib(r['peak_total_bytes'])} |", ""]
    return "\n".join(lines)


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "report.md").write_text(render_markdown(report))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true", help="plan, wheel check, tiny sizes on CPU")
    parser.add_argument("--wheels", type=Path, default=Path(__file__).with_name("wheels"))
    parser.add_argument("--tests-xml", type=Path, default=None, help="pytest JUnit XML of the gpu tests")
    parser.add_argument("--plan", action="store_true", help="print the plan and check the wheels, run nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sizes = TINY if args.dry_run else FULL
    m = sizes.model
    if args.plan:
        print(PLAN.format(wheels=args.wheels, pins=", ".join(f"{p.name}=={p.version}" for p in read_pins()),
                          matmul=sizes.matmul_size, loss_tokens=sizes.loss_tokens, vocabs=list(sizes.loss_vocabs),
                          layers=m.num_layers, hidden=m.hidden_size, seqs=sizes.step_sequences,
                          seq=sizes.step_prompt_tokens + sizes.step_response_tokens, batch=sizes.rollout_batch,
                          new=sizes.rollout_new_tokens, out=args.out), flush=True)
    problems = check_folder(args.wheels)
    for problem in problems:
        print(f"wheels: {problem}", flush=True)
    if not problems:
        print(f"wheels: all {len(read_pins())} pinned wheels present with cp312/py3 tags", flush=True)
    if args.plan:
        return 1 if problems else 0
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run on a machine without a GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda" if not args.dry_run else "cpu")
    report = {"dry_run": args.dry_run, "command": " ".join(["benchmarks/gpu/run.sh", str(args.out)]
                                                             + (["--dry-run"] if args.dry_run else [])),
              "environment": describe_environment(device), "wheel_problems": problems}
    if args.tests_xml:
        report["tests"] = read_test_results(args.tests_xml)
    started = time.perf_counter()
    report["matmul_tflops"] = matmul_tflops(device, sizes.matmul_size, sizes.repeats)
    write_report(report, args.out)
    report["loss"] = loss_bench.run(sizes, device)
    write_report(report, args.out)
    report["step"], report["rollout"] = step_bench.run_step(sizes, report["matmul_tflops"], device)
    report["seconds"] = time.perf_counter() - started
    write_report(report, args.out)
    print(render_markdown(report), flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
