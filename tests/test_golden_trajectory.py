"""Golden trajectory: a reduced embedded default must reproduce, bit for bit on CPU, the stored run.

Two variants cover the step's branches: the `caopd demo` preset (the paper's EMA teacher with teacher-format
replay, unfused reverse KL, no clipping) and a frozen teacher without replay (fused chunked JSD, clipping at 1). For
each, the warm-up losses, every OPD and CaOPD training-log row (loss, grad norm, lr, rollout accuracy and
confidences) and the final evaluation summary are compared with `tests/assets/golden_demo.json`.

Rows are compared on the golden's keys: a new log key added by a feature does not break the test until the
asset is regenerated with it, and ``--regenerate`` refuses to write unless every key already stored comes
out bit for bit the same (``--force`` overrides, for a change that is meant to move numbers).

Tolerance: none. On one machine a CPU run is deterministic (fixed threads, keyed sampling noise), and every
refactor of the step, the schedules or the process groups is meant to leave the arithmetic unchanged; a
change that legitimately changes numbers regenerates the asset in its own commit, saying why:

    python tests/test_golden_trajectory.py --regenerate [--force]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cli_e2e import TINY, caopd, read_jsonl  # noqa: E402

ASSET = Path(__file__).resolve().parent / "assets" / "golden_demo.json"
COMMON = [*TINY, "warmup.steps=30", "warmup.batch_size=32", "distill.steps=4"]
VARIANTS = {
    "demo_preset": [],
    "frozen_fused_jsd": ["teacher.mode=frozen", "teacher.replay_fraction=0", "distill.fused=true",
                             "distill.chunk_size=3", "distill.loss=jsd", "distill.beta=0.5", "distill.grad_clip=1.0"],
}


def trajectory(out: Path, overrides: list[str]) -> dict:
    caopd("demo", *COMMON, *overrides, f"run.output_dir={out}")
    return {
        "warmup": [r["loss"] for r in read_jsonl(out / "warmup_log.jsonl")],
        "opd": read_jsonl(out / "opd" / "train_log.jsonl"),
        "caopd": read_jsonl(out / "caopd" / "train_log.jsonl"),
        "summary": json.loads((out / "summary.json").read_text()),
    }


def on_golden_keys(got, golden):
    """``got`` restricted to the keys ``golden`` has (recursively through dicts and lists of the same length)."""
    if isinstance(golden, dict) and isinstance(got, dict):
        return {k: on_golden_keys(got[k], v) if k in got else "<missing>" for k, v in golden.items()}
    if isinstance(golden, list) and isinstance(got, list) and len(got) == len(golden):
        return [on_golden_keys(a, b) for a, b in zip(got, golden)]
    return got


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_reduced_demo_reproduces_the_golden_trajectory(tmp_path: Path, variant: str) -> None:
    golden = json.loads(ASSET.read_text())[variant]
    got = trajectory(tmp_path / variant, VARIANTS[variant])
    assert len(got["warmup"]) == 30 and len(got["opd"]) == 4
    assert got["warmup"] == golden["warmup"]
    for run in ("opd", "caopd"):
        assert on_golden_keys(got[run], golden[run]) == golden[run], run
    assert got["summary"] == golden["summary"]


if __name__ == "__main__" and "--regenerate" in sys.argv:
    import tempfile

    old = json.loads(ASSET.read_text()) if ASSET.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        new = {v: trajectory(Path(tmp) / v, o) for v, o in VARIANTS.items()}
    changed = [v for v in old if v in new and on_golden_keys(new[v], old[v]) != old[v]]
    if changed and "--force" not in sys.argv:
        sys.exit(f"not written: stored keys changed in {changed} (pass --force if that is intended)")
    ASSET.write_text(json.dumps(new, indent=1) + "\n")
    print(f"wrote {ASSET}; stored keys unchanged in {sorted(set(old) - set(changed))}")
