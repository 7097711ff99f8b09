# The two commands of the README: `make demo` (set up, run the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test-tools demo test bench clean

setup:
	bash scripts/setup.sh

test-tools:
	bash scripts/install-test-tools.sh

demo: setup
	bash scripts/demo.sh

test: setup test-tools
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/bench_engine.py --quick
	$(PY) benchmarks/bench_ep.py --quick

clean:
	rm -rf $(VENV) checkpoints runs benchmarks/results
