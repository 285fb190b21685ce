"""`benchmarks/bench_demo_seeds.py --previous`: seeds taken from an earlier run are not rerun, and the report's
mean ± sd and per-seed acceptance come from them (checked against a direct computation with `statistics`)."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STORED = ROOT / "benchmarks" / "results" / "demo_seeds.json"


def test_previous_seeds_are_reported_without_rerunning(tmp_path):
    stored = json.loads(STORED.read_text())
    previous = tmp_path / "previous.json"
    previous.write_text(json.dumps({k: stored[k] for k in ("1", "4")}))
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_demo_seeds.py"), "--seeds", "1", "4",
                          "--previous", str(previous), "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert not (out / "demo_seed1").exists() and not (out / "demo_seed4").exists()  # nothing was rerun
    report = (out / "demo_seeds.md").read_text()
    accs = [stored[k]["CaOPD"]["accuracy"] for k in ("1", "4")]
    assert f"| CaOPD | {statistics.mean(accs):.3f} ± {statistics.stdev(accs):.3f} |" in report
    gap4 = stored["4"]["CaOPD"]["accuracy"] - stored["4"]["OPD"]["accuracy"]
    assert gap4 < -0.03 and "seed 4: 3/4 (CaOPD acc >= OPD acc - 0.03)" in report
    assert json.loads((out / "demo_seeds.json").read_text())["4"] == stored["4"]
