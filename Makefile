# `make demo` trains the tiny model; `make test` runs the test suite, `make test-fast` only its
# single-process tests (the quick inner loop). All create .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch that lies on the development and CI machines; GPU machines bring their own.
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q -e '.[hf,test]'
	touch $(STAMP)

# DATA="files..." trains on your files instead of the Python standard library's sources.
demo: $(STAMP)
	PY=$(BIN)/python DATA="$(DATA)" launch/demo.sh

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not multiprocess and not gpu" $(PYTEST_ARGS)

# Only what make made: the venv and the demo's outputs. runs/ may hold your own checkpoints (the
# README's examples put them there): it is never removed whole.
clean:
	rm -rf $(VENV)
	launch/demo.sh --clean
