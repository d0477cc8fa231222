# The commands people type. Everything runs in .venv, created on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# every file the installed copy in .venv is made from (each package of setup.cfg, the schemas)
SOURCES := setup.cfg setup.py README.rst $(wildcard activitynet/*.py activitynet/client/*.py \
           activitynet/testing/*.py activitynet/web/* schemas/*.json)
SEED ?= $(shell date +%s)
CHAOS_SECONDS ?= 300

.PHONY: test run chaos bench bench-short clean

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check ".[test]"
	touch $(STAMP)

## make test: set up .venv if needed and run the whole suite (what CI runs)
test: $(STAMP)
	$(PY) -m pytest

## make run: start one server on the default port 3780 (ARGS="-lp 3781 -rh ..." to change),
## keeping its users and history in DATA_DIR (default .data/ here; see README, Durable store)
DATA_DIR ?= .data
run: $(STAMP)
	cd /tmp && $(abspath $(PY)) -m activitynet.server -lh 127.0.0.1 --data-dir $(abspath $(DATA_DIR)) $(ARGS)

## make chaos SEED=n CHAOS_SECONDS=s: the long fault-injection run, replayable by its seed
chaos: $(STAMP)
	CHAOS_SEED=$(SEED) CHAOS_SECONDS=$(CHAOS_SECONDS) $(PY) -m pytest -m chaos -s tests/test_chaos.py tests/test_chaos_heal.py

## make bench: the benchmark suite (make bench-short: the under-2-minute version)
BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check ".[bench]"
	touch $(BENCH_STAMP)

## make bench also draws the scaling curves (matplotlib, the "bench" extra, installed here only)
bench: $(BENCH_STAMP)
	$(PY) -m benchmarks

bench-short: $(STAMP)
	$(PY) -m benchmarks --short

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
