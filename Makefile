# Two commands do everything on a fresh machine:
#   make demo        install, then run the embedded default (tiny CaOPD job on CPU, ~8 minutes on 2 cores)
#   make test        install, then run the whole test suite (what CI runs: .ci/run)
# and one for the edit-test loop:
#   make test-fast   install, then the suite without the `slow` (multi-process, end-to-end) and `slurm` tests
# PYTHON may name another interpreter, e.g. a virtual environment's: make test PYTHON=/tmp/env/bin/python
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# CPU installs pin torch 2.13.0 (a CPU wheel); an unpinned torch would pull GBs of CUDA wheels.
TORCH_PIN ?= torch==2.13.0
FAST ?= not slow and not slurm
# MEGATRON=newest (CI's second job; a compatibility check, never a user's install): `install` then replaces
# megatron-core by the newest release. Releases after 0.16.1 declare Python >= 3.12, hence
# --ignore-requires-python on a 3.11 machine; --no-deps keeps torch as installed, and the modules they
# import at start-up (triton) are added by name.
MEGATRON ?=

.PHONY: install demo test test-fast bench

install:
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e ".[test]"
ifeq ($(MEGATRON),newest)
	$(PIP) install -q --upgrade --ignore-requires-python --no-deps megatron-core
	$(PIP) install -q triton numpy packaging
endif

demo: install
	$(PYTHON) -m caopd_megatron.cli.main demo

test: install
	$(PYTHON) -m pytest -q tests

test-fast: install
	$(PYTHON) -m pytest -q -m "$(FAST)" tests

bench: install
	$(PYTHON) benchmarks/bench_losses.py --quick
	$(PYTHON) benchmarks/bench_demo_seeds.py
