# posattn: two commands on a fresh machine
#   make demo   set up, build, tune+benchmark the catalogue here, write bench-out/index.html
#   make test   set up, build, run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch is installed only when none is importable in the venv (which sees the
# system site-packages, so a machine's own torch build, e.g. a CUDA one, is kept)
TORCH_SPEC ?= torch==2.13.0

CSRC := $(shell find csrc -name '*.h' -o -name '*.cpp' -o -name '*.cu' 2>/dev/null)

.PHONY: demo test bench gpu-check setup build clean

$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

$(VENV)/.deps: $(PY) requirements/test.txt requirements/build.txt
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -r requirements/test.txt
	touch $@

setup: $(VENV)/.deps

$(VENV)/.built: $(VENV)/.deps setup.py pyproject.toml $(CSRC)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.built

demo: build
	$(VENV)/bin/posattn bench --quick -o bench-out
	@echo "dashboard: $(CURDIR)/bench-out/index.html"

test: build
	$(PY) -m pytest -q

bench: build
	$(PY) -m pytest -q benchmarks --benchmark-only --benchmark-autosave

gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf build bench-out $(VENV)/.built posattn/*.so
