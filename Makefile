# `make run`: set up .venv and embed the bundled sample corpus. `make test`: set up and test.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned first to the CPU wheel; a GPU machine installs its CUDA torch instead
# (any version the project's range allows) before `make setup`.
TORCH ?= torch==2.13.0
MODEL ?= pkshatech/GLuCoSE-base-ja
OUT ?= out/sample

.PHONY: setup run run-offline test lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

run: setup
	$(BIN)/python -m jobs.embed_corpus --input samples/corpus --output $(OUT) --model $(MODEL) --keep-columns source

# No internet: build a small random-weight model with GLuCoSE's layout (once: a rebuilt model
# is a new revision, which the output would refuse to mix) and embed with it.
run-offline: setup
	test -f .tiny-model/model.safetensors || HF_HUB_OFFLINE=1 $(BIN)/python -m jobs.make_tiny_model .tiny-model
	HF_HUB_OFFLINE=1 $(BIN)/python -m jobs.embed_corpus --input samples/corpus --output $(OUT) --model .tiny-model --keep-columns source

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) out .tiny-model
