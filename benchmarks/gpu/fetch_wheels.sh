#!/usr/bin/env bash
# Fill benchmarks/gpu/wheels/ (gitignored) with the wheels that benchmarks/gpu/run.sh installs on a GPU machine
# without network: CPython 3.12, x86-64 Linux, no dependencies resolved (the list in wheels.txt is complete).
# Run on any machine with access to the package registry:   bash benchmarks/gpu/fetch_wheels.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dest="${1:-$here/wheels}"
python="${PYTHON:-python3}"
mkdir -p "$dest"
# Pins with a wheel on the registry, downloaded for Python 3.12 whatever this machine's Python is.
grep -v '^#' "$here/wheels.txt" | grep -v 'sdist only' | sed 's/#.*//' | grep -v '^ *$' > "$dest/.binary.txt"
"$python" -m pip download --python-version 3.12 --platform manylinux_2_28_x86_64 --only-binary=:all: --no-deps \
    -r "$dest/.binary.txt" -d "$dest"
# Pins published only as source: pure Python, so the wheel built here installs anywhere (py3-none-any).
grep 'sdist only' "$here/wheels.txt" | sed 's/#.*//' | while read -r spec; do
    "$python" -m pip wheel --no-deps --no-binary=:all: "$spec" -w "$dest"
done
rm -f "$dest/.binary.txt"
cd "$here/../.." && "$python" -m benchmarks.gpu.wheels "$dest"
