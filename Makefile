# lowrank_vit: run `make help` for the targets.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch and torchvision are pinned to releases whose wheels are commonly cached (timm needs torchvision). The default
# wheels from PyPI are CUDA builds (they run on a CPU too). Override for another CUDA or torch version, or for the
# CPU-only wheels: make install TORCH_SPEC="--index-url https://download.pytorch.org/whl/cpu torch==2.14.1
# torchvision==0.29.1 --extra-index-url https://pypi.org/simple" (see the README's set-up section).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
TEST_ENV := HF_HUB_OFFLINE=1 WANDB_MODE=offline OMP_WAIT_POLICY=PASSIVE
# test processes side by side (pytest-xdist; the suite's tests are independent, each with its own tmp_path):
# TEST_JOBS=0 runs them in this one process, e.g. to use pdb
TEST_JOBS ?= 2
# reproduce-*: SCALE=full (the paper: ImageNet, timm weights, GPUs) or SCALE=smoke (MNIST stand-ins, CPU, minutes);
# ARGS passes more options, e.g. ARGS="--devices 8 --wandb online".
SCALE ?= full
ARGS ?=
# rehearse: the generated ImageNet layout (hub-parquet, imagefolder or flat-val) and the file each row's outcome is
# appended to (ARGS=--resume continues a run that stopped, skipping the rows already ok there)
LAYOUT ?= hub-parquet
REHEARSE_RECORD ?= results/rehearse.jsonl
CLI := $(BIN)/lowrank-vit

.DEFAULT_GOAL := help
.PHONY: help install test test-fast mutants mutants-listed lint clean demo demo-refresh check-plans reproduce-table1 reproduce-table2 reproduce-table3 \
	reproduce-table4 reproduce-ablation reproduce-compare reproduce-vmeanba compare-cifar10 rehearse

help:  ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-18s %s\n", $$1, $$2}'

install: $(BIN)/.installed  ## create .venv and install the package (editable) with its dev extras

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_SPEC) -e '.[dev]'
	touch $@

test: $(BIN)/.installed  ## the whole test suite, slow tests included: the CI command (installs first if needed)
	$(TEST_ENV) $(BIN)/python -m pytest -q -n $(TEST_JOBS)

test-fast: $(BIN)/.installed  ## the edit-test loop: every test not marked slow (-m "not slow"), about 2.5 minutes on 2 cores
	$(TEST_ENV) $(BIN)/python -m pytest -q -n $(TEST_JOBS) -m "not slow"

mutants: $(BIN)/.installed  ## mutmut on a seeded sample of 200 generated mutants of the user-facing modules: caught per module, survivors (tools/mutation_sample.py; 45 min)
	$(TEST_ENV) $(BIN)/python tools/mutation_sample.py $(ARGS)

mutants-listed: $(BIN)/.installed  ## the 120 hand-written defects the tests must catch, one at a time in a copy (12-15 min; tools/mutants.py)
	$(BIN)/python tools/mutants.py $(ARGS)

lint: $(BIN)/.installed  ## ruff over the package, the tests and the tools
	$(BIN)/ruff check lowrank_vit experiments tests benchmarks tools

demo: $(BIN)/.installed  ## miniature Table 2 on the MNIST stand-in of DeiT-S, offline, CPU (results/demo/)
	$(CLI) demo $(ARGS)

demo-refresh: $(BIN)/.installed  ## re-run every demo row, then refresh experiments/results/demo_table2.* and the README's excerpt
	$(CLI) demo --force --publish $(ARGS)

check-plans: $(BIN)/.installed  ## plan every compressed row of Tables 2-4 at full size; check counts and sizes
	HF_HUB_OFFLINE=1 $(BIN)/python -m experiments.check_plans $(ARGS)

reproduce-table1: $(BIN)/.installed  ## Table 1 (Z kinds, residual error); SCALE=smoke for the CPU version
	$(CLI) reproduce table1 --scale $(SCALE) $(ARGS)

reproduce-table2: $(BIN)/.installed  ## Table 2 (ours vs vanilla SVD + FT, -40/-50/-60%)
	$(CLI) reproduce table2 --scale $(SCALE) $(ARGS)

reproduce-table3: $(BIN)/.installed  ## Table 3 (large models compressed to small ones' size)
	$(CLI) reproduce table3 --scale $(SCALE) $(ARGS)

reproduce-table4: $(BIN)/.installed  ## Table 4 (model size in MiB with 8- and 4-bit PTQ)
	$(CLI) reproduce table4 --scale $(SCALE) $(ARGS)

reproduce-ablation: $(BIN)/.installed  ## the ablations the paper lacks
	$(CLI) reproduce ablation --scale $(SCALE) $(ARGS)

reproduce-compare: $(BIN)/.installed  ## ours vs plain/mean/ASVD/FWSVD/COMCAT at equal parameters, with/without FT
	$(CLI) reproduce compare --scale $(SCALE) $(ARGS)

reproduce-vmeanba: $(BIN)/.installed  ## VMeanba, the low-rank default and both on VMamba-T/S/B (vision state-space models)
	$(CLI) reproduce vmeanba --scale $(SCALE) $(ARGS)

rehearse: $(BIN)/.installed  ## every full-scale row of Tables 1-4, ablations, comparison, VMeanba on the CPU (random weights, generated data, 2 DDP processes)
	$(TEST_ENV) $(CLI) rehearse table1 table2 table3 table4 ablation compare vmeanba --devices 2 --layout $(LAYOUT) \
		--record $(REHEARSE_RECORD) $(ARGS)

compare-cifar10: $(BIN)/.installed  ## the comparison on a small DeiT trained here on CIFAR-10 (CIFAR10=path/to/parquet)
	@test -n "$(CIFAR10)" || { echo "compare-cifar10: give CIFAR10=DIR (train.parquet and test.parquet of uoft-cs/cifar10)"; exit 2; }
	$(BIN)/python -m experiments.cifar10 --data $(CIFAR10) $(ARGS)

clean:  ## remove .venv and caches (results/ is left alone)
	rm -rf $(VENV) .pytest_cache .ruff_cache
