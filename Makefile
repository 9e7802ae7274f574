# The two README commands:
#   make run    set up .venv and run the whole pipeline on the embedded default (phantoms, tiny models, CPU)
#   make test   set up .venv and run the test suite
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
CORES   ?= 2
# stage commands call `python` / `accelerate`: make them the venv's
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup run test dvc-repro bench lock clean-data

# exact versions and hashes from requirements.lock (torch 2.14.1 / torchvision 0.29.1 lie on
# the machine's disk); medrl itself on top, without re-resolving anything. pip byte-compiles on
# one core; compileall does the same on all of them (a few files meant for newer Pythons fail
# to compile, as they do under pip, hence the ignored status)
$(BIN)/medrl: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --no-compile --require-hashes -r requirements.lock
	-$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/medrl env --check-lock requirements.lock
	touch $(BIN)/medrl

setup: $(BIN)/medrl
	bash workflow/profiles/install.sh

run: setup
	$(BIN)/snakemake --cores $(CORES) all

dvc-repro: setup
	$(BIN)/dvc repro

test: setup
	bash .ci/test.sh

# resolve pyproject.toml's ranges anew into requirements.lock (then `make setup` installs it)
lock: setup
	$(BIN)/medrl env --write-lock requirements.lock

bench: setup
	$(BIN)/medrl bench

clean-data:
	rm -rf data/datasets data/prepared data/models data/latents data/rl data/samples data/metrics data/tables data/.ckpt .snakemake mlflow.db mlartifacts
