# Two commands on a fresh machine:  `make run` (set up + serve the embedded default)  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# CPU build of PyTorch; GPU users install their own CUDA build into .venv first (see README) and it is kept.
TORCH  ?= torch==2.13.0
ARGS   ?=

.PHONY: run test lint install system-deps prepare bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "$(TORCH)"
	$(BIN)/pip install -e '.[embedded,client,dev,voice]'
	# The Qwen tokenizer file ships in this wheel; its dependencies are not needed and it is never imported.
	$(BIN)/pip install --no-deps dashscope==2.0.2
	touch $@

install: $(STAMP)

system-deps:
	bash scripts/install-system-deps.sh

prepare: install
	$(BIN)/python -m assistant prepare

run: install prepare
	$(BIN)/python -m assistant serve $(ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: install system-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m assistant prepare
	$(BIN)/python -m pytest $(ARGS)

bench: install prepare
	$(BIN)/python -m bench.embedded_latency
	$(BIN)/python -m bench.engine_throughput
	$(BIN)/python -m bench.server_latency
	$(BIN)/python -m bench.stalls
	$(BIN)/python -m bench.voice_latency
	$(BIN)/python -m bench.wake_word

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache test-output
