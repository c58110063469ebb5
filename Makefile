PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
PYTEST_ARGS ?=

.PHONY: install test test-all bench clean

install:
	$(PIP) install -c constraints.txt -e ".[test]"

test:
	$(PYTHON) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-all:
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

bench:
	$(PYTHON) benchmarks/less_shaping.py
	$(PYTHON) benchmarks/vocab_parallel.py

clean:
	rm -rf build dist *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
