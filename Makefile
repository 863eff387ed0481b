# The two commands of the README. Each does all set-up on a fresh machine: a virtual environment in .venv,
# the pinned torch (CPU build), the requirements, and the extension built in place.
#   make demo   train and evaluate a dense and a GSFFI head on the built-in synthetic data, on the CPU
#   make test   the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: demo test build bench-cpu clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH) -r requirements.txt
	touch $@

build: $(VENV)/.installed
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

demo: build
	$(PY) -m torch_xmc compare --plot runs/compare.png --json runs/compare.json

test: build
	$(PY) -m pytest -q

bench-cpu: build
	THP_MEM_ALLOC_ENABLE=1 $(PY) benchmarks/bench_cpu.py --threads 2

clean:
	rm -rf $(VENV) build *.egg-info torch_xmc/_C*.so
