#!/usr/bin/env bash
# The prepared GPU run: one H200 (Python 3.12, torch + CUDA + triton, no megatron-core, no network), 8 minutes.
#   bash benchmarks/gpu/run.sh OUT_DIR            # installs the carried wheels, runs the gpu tests and benchmarks
#   bash benchmarks/gpu/run.sh OUT_DIR --dry-run  # anywhere: the plan, the wheel check, tiny sizes on CPU
# The wheels come from benchmarks/gpu/fetch_wheels.sh (folder benchmarks/gpu/wheels/, or $CAOPD_GPU_WHEELS).
# Writes OUT_DIR/report.md, OUT_DIR/report.json, OUT_DIR/gpu_tests.xml and OUT_DIR/run.log.
set -uo pipefail
if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: $0 OUT_DIR [--dry-run]" >&2
    exit 2
fi
out="$(mkdir -p "$1" && cd "$1" && pwd)"
dry_run=0
[[ "${2:-}" == "--dry-run" ]] && dry_run=1
root="$(cd "$(dirname "$0")/../.." && pwd)"
wheels="${CAOPD_GPU_WHEELS:-$root/benchmarks/gpu/wheels}"
python="${PYTHON:-python3}"
cd "$root"
exec > >(tee "$out/run.log") 2>&1
start=$SECONDS
stamp() { echo "[run.sh +$((SECONDS - start))s] $*"; }

if [[ $dry_run == 0 ]]; then
    # A private install target: the machine's torch / CUDA / triton stay as they are.
    site="$out/.site"
    stamp "installing $(ls "$wheels"/*.whl 2>/dev/null | wc -l) wheels from $wheels"
    if "$python" -m pip --version >/dev/null 2>&1; then
        timeout 60 "$python" -m pip install -q --no-index --no-deps --target "$site" "$wheels"/*.whl
    else  # no pip: a wheel is a zip of site-packages (none of these needs its scripts or .data)
        for whl in "$wheels"/*.whl; do "$python" -m zipfile -e "$whl" "$site"; done
    fi || { stamp "wheel install failed"; exit 1; }
    export PYTHONPATH="$root:$site${PYTHONPATH:+:$PYTHONPATH}"
    "$python" -m benchmarks.gpu.suite --out "$out" --wheels "$wheels" --plan
    stamp "tests marked gpu"
    timeout 150 "$python" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider --junitxml "$out/gpu_tests.xml"
    tests_status=$?
    stamp "tests: exit $tests_status; benchmarks"
    timeout 240 "$python" -m benchmarks.gpu.suite --out "$out" --wheels "$wheels" --tests-xml "$out/gpu_tests.xml"
    status=$?
else
    export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
    "$python" -m benchmarks.gpu.suite --out "$out" --wheels "$wheels" --plan --dry-run
    stamp "dry run: the gpu tests' code paths on CPU (CAOPD_GPU_TESTS_ON_CPU=1)"
    CAOPD_GPU_TESTS_ON_CPU=1 timeout 300 "$python" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider \
        --junitxml "$out/gpu_tests.xml"
    tests_status=$?
    stamp "tests: exit $tests_status; benchmarks at tiny sizes on CPU"
    timeout 300 "$python" -m benchmarks.gpu.suite --out "$out" --wheels "$wheels" --tests-xml "$out/gpu_tests.xml" \
        --dry-run
    status=$?
fi
[[ $status == 0 ]] && status=$tests_status
stamp "done (exit $status); report in $out/report.md"
exit $status
