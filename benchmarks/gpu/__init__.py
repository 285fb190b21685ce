"""The prepared single-GPU run (``benchmarks/gpu/run.sh``): wheel check, loss / step / rollout benchmarks, report."""
