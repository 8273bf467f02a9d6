# Two entry points, each complete on a fresh machine with only Python and pip.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build. Keep a CUDA torch that is already there.
	@if $(PY) -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
		echo "CUDA torch already installed: keeping it"; \
	else \
		$(PY) -m pip install --quiet torch==2.13.0; \
	fi
	$(PY) -m pip install --quiet -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m flexdraft demo

test: $(STAMP)
	$(PY) -m flexdraft fetch
	# First, alone, the tests that time themselves (a neighbour's load counts in their timings; run just after the
	# parallel pass, the prediction test missed its tolerance twice in one clean-clone run), then the rest on a
	# worker per core (at most 4: each loads its own models).
	$(PY) -m pytest -q -m serial tests
	$(PY) -m pytest -q -n auto --maxprocesses 4 -m "not serial" tests
	# Kernel benchmarks as a smoke test (interpreted on a CPU: they prove the benchmarks run, not speed).
	$(PY) -m pytest -q tests/bench_kernels.py --benchmark-only -p no:cacheprovider --benchmark-disable-gc --benchmark-max-time=0.01 --benchmark-min-rounds=1

clean:
	rm -rf $(VENV)

.PHONY: bench-regress
# Decode-step benchmarks against this device's stored baseline (benchmarks/<device>/); --save rewrites it.
bench-regress: $(STAMP)
	$(PY) -m experiments.regress
