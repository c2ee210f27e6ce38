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

# every build input: sources, headers and the bodies they include (*_impl.inc, clones.inc)
CSRC := $(shell find csrc -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' -o -name '*.inc' 2>/dev/null)

.PHONY: demo test bench gpu-check setup build clean setup-browser

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

# Results committed from GPU runs (benchmarks/results/<gpu>/) are drawn beside this machine's.
BENCH_WITH := $(addprefix --with ,$(wildcard benchmarks/results))

demo: build
	@# tune first (writes this machine's config cache), so that bench times tuned kernels
	$(VENV)/bin/posattn tune --quick --ops all
	$(VENV)/bin/posattn bench --quick -o bench-out $(BENCH_WITH)
	@echo "dashboard: $(CURDIR)/bench-out/index.html"

# The dashboard's browser test needs a headless chromium: install Debian's
# package when it is missing and we may (root with apt-get). Otherwise that
# test skips, and fails under CI=true.
setup-browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
	    || [ -x /usr/lib/chromium/chromium ] || [ -n "$$POSATTN_CHROMIUM" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's chromium (for the dashboard's browser test)"; \
	  if ! (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) \
	      >/tmp/posattn-apt-chromium.log 2>&1; then \
	    tail -n 5 /tmp/posattn-apt-chromium.log; \
	    echo "warning: chromium could not be installed; the browser test will skip (and fail under CI=true)"; \
	  fi; \
	else \
	  echo "note: no chromium and no root/apt-get: the dashboard's browser test will skip (and fail under CI=true)"; \
	fi

test: build setup-browser
	$(PY) -m pytest -q

# pytest-benchmark suites; BENCH_ARGS=--benchmark-compare compares with the last saved run.
# Then the host-overhead targets (dispatch and plan microseconds), asserted: timing is noisy,
# so they stay out of `make test`; run `make bench` on a quiet machine.
BENCH_ARGS ?=
bench: build
	$(PY) -m pytest -q benchmarks --benchmark-only --benchmark-autosave $(BENCH_ARGS)
	POSATTN_BENCH_ASSERT=1 $(PY) -m pytest -q benchmarks/test_bench_overhead.py -k test_targets

gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf build bench-out $(VENV)/.built posattn/*.so
