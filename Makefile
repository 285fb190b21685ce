# Two commands do everything on a fresh machine:
#   make demo   install, then run the embedded default (tiny CaOPD job on CPU, ~8 minutes on 2 cores)
#   make test   install, then run the test suite (what CI runs)
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# CPU installs pin torch 2.13.0 (a CPU wheel); an unpinned torch would pull GBs of CUDA wheels.
TORCH_PIN ?= torch==2.13.0

.PHONY: install demo test bench

install:
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e ".[test]"

demo: install
	$(PYTHON) -m caopd_megatron.cli.main demo

test: install
	$(PYTHON) -m pytest -q tests

bench: install
	$(PYTHON) benchmarks/bench_losses.py --quick
	$(PYTHON) benchmarks/bench_demo_seeds.py
