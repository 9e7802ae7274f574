# The two README commands:
#   make run    set up .venv and run the whole pipeline on the embedded default (phantoms, tiny models, CPU)
#   make test   set up .venv and run the test suite
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
CORES   ?= 2
# stage commands call `python` / `accelerate`: make them the venv's
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup run test dvc-repro bench clean-data

$(BIN)/medrl: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch/torchvision first, pinned: these exact builds lie on the machine's disk
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/medrl

setup: $(BIN)/medrl
	bash workflow/profiles/install.sh

run: setup
	$(BIN)/snakemake --cores $(CORES) all

dvc-repro: setup
	$(BIN)/dvc repro

test: setup
	bash .ci/test.sh

bench: setup
	$(BIN)/medrl bench

clean-data:
	rm -rf data/datasets data/prepared data/models data/latents data/rl data/samples data/metrics data/tables data/.ckpt .snakemake mlflow.db mlartifacts
