"""Golden trajectory: a reduced embedded default must reproduce, bit for bit on CPU, the stored run.

Two variants cover the step's branches: the `caopd demo` preset (frozen teacher, unfused reverse KL, no
clipping) and the paper's teacher (EMA with teacher-format replay, fused chunked JSD, clipping at 1). For
each, the warm-up losses, every OPD and CaOPD training-log row (loss, grad norm, lr, rollout accuracy and
confidences) and the final evaluation summary are compared with `tests/assets/golden_demo.json`.

Tolerance: none. On one machine a CPU run is deterministic (fixed threads, keyed sampling noise), and every
refactor of the step, the schedules or the process groups is meant to leave the arithmetic unchanged; a
change that legitimately changes numbers regenerates the asset in its own commit, saying why:

    python tests/test_golden_trajectory.py --regenerate
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
    "ema_replay_fused_jsd": ["teacher.mode=ema", "teacher.replay_fraction=0.25", "distill.fused=true",
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


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_reduced_demo_reproduces_the_golden_trajectory(tmp_path: Path, variant: str) -> None:
    golden = json.loads(ASSET.read_text())[variant]
    got = trajectory(tmp_path / variant, VARIANTS[variant])
    assert len(got["warmup"]) == 30 and len(got["opd"]) == 4
    assert got["warmup"] == golden["warmup"]
    for run in ("opd", "caopd"):
        assert got[run] == golden[run], run
    assert got["summary"] == golden["summary"]


if __name__ == "__main__" and "--regenerate" in sys.argv:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        ASSET.write_text(json.dumps({v: trajectory(Path(tmp) / v, o) for v, o in VARIANTS.items()}, indent=1) + "\n")
    print(f"wrote {ASSET}")
