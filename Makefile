# lowrank_vit: run `make help` for the targets.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch and torchvision are pinned to releases whose wheels are commonly cached (timm needs torchvision, whose
# wheels need a CUDA build of torch; it runs on the CPU too). Override for another CUDA or torch version.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
TEST_ENV := HF_HUB_OFFLINE=1 WANDB_MODE=offline

.DEFAULT_GOAL := help
.PHONY: help install test lint clean

help:  ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-18s %s\n", $$1, $$2}'

install: $(BIN)/.installed  ## create .venv and install the package (editable) with its dev extras

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_SPEC) -e '.[dev]'
	touch $@

test: $(BIN)/.installed  ## run the test suite (installs first when .venv is missing)
	$(TEST_ENV) $(BIN)/python -m pytest -q

lint: $(BIN)/.installed  ## ruff over the package and the tests
	$(BIN)/ruff check lowrank_vit tests

clean:  ## remove .venv and caches (results/ is left alone)
	rm -rf $(VENV) .pytest_cache .ruff_cache
