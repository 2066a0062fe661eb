# Two commands from a fresh clone:  `make demo` (the whole chain on the embedded data)  and  `make test`.
# Each builds the pinned environments first (idempotent: a stamp file per venv).

PYTHON ?= python3
VENV := .venv
I2D_VENV := .venv-img2dataset
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
I2D_STAMP := $(I2D_VENV)/.installed
CORES ?= 2
PIP_QUIET ?= -q
# sam2 ships only an sdist whose CUDA extension cannot build without a GPU; without build isolation it
# builds in seconds against the torch already installed.
SAM2 := sam2==1.1.0

export POWERCLIP_IMG2DATASET := $(CURDIR)/$(I2D_VENV)/bin/img2dataset

.PHONY: all venv demo test test-fast lint format bench clean help

help:
	@echo "make demo       run the workflow on the embedded dataset (CPU, no network)"
	@echo "make test       run the whole test suite (builds the venvs first)"
	@echo "make test-fast  skip tests marked slow"
	@echo "make lint       snakemake --lint and snakefmt --check"
	@echo "make bench      run the benchmarks in bench/ (results go to BENCHMARKS.md by hand)"

venv: $(STAMP) $(I2D_STAMP)

$(STAMP): requirements/main.txt requirements/spacy-model.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_QUIET) -r requirements/main.txt
	$(BIN)/pip install $(PIP_QUIET) --no-deps --require-hashes -r requirements/spacy-model.txt
	SAM2_BUILD_CUDA=0 $(BIN)/pip install $(PIP_QUIET) --no-build-isolation $(SAM2)
	$(BIN)/pip install $(PIP_QUIET) --no-deps --no-build-isolation -e .
	touch $@

# img2dataset pins webdataset<0.3 and pandas<3: it gets a venv of its own, called as a command.
$(I2D_STAMP): requirements/img2dataset.txt
	$(PYTHON) -m venv $(I2D_VENV)
	$(I2D_VENV)/bin/pip install $(PIP_QUIET) -r requirements/img2dataset.txt
	touch $@

demo: venv
	$(BIN)/snakemake --cores $(CORES) all

test: venv
	$(BIN)/pytest

test-fast: venv
	$(BIN)/pytest -m "not slow"

lint: venv
	$(BIN)/snakemake --lint
	$(BIN)/snakefmt --check .

format: venv
	$(BIN)/snakefmt .

bench: venv
	$(BIN)/python bench/bench_parse.py
	$(BIN)/python bench/bench_segment.py

clean:
	rm -rf results logs benchmarks .snakemake
