# Set-up and the everyday commands. Every target creates .venv and installs on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; GPU users install their CUDA build into the venv first (README).
TORCH ?= torch==2.13.0
SHARED_DATA := $(abspath ../shared/data)
ifneq ($(wildcard $(SHARED_DATA)/.),)
export LMFORGE_DATA_DIR ?= $(SHARED_DATA)
endif
DEMO_OUT ?= out

.PHONY: install demo test lint format docs clean

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/lmforge prepare tinyshakespeare --tokenizer char --out $(DEMO_OUT)/data/shakespeare-char --overwrite
	$(BIN)/lmforge train shakespeare-char --set data.dir=$(DEMO_OUT)/data/shakespeare-char \
		--out $(DEMO_OUT)/runs/shakespeare-char --overwrite
	$(BIN)/lmforge sample $(DEMO_OUT)/runs/shakespeare-char --num-samples 2 --max-new-tokens 400
	@echo "next: $(BIN)/lmforge chat $(DEMO_OUT)/runs/shakespeare-char, or" \
		"$(BIN)/lmforge export $(DEMO_OUT)/runs/shakespeare-char --out $(DEMO_OUT)/hf (a Llama for transformers)"

# pytest-xdist: one worker per core (pyproject.toml's -ra lists every skip with its reason). Then the
# bf16-path tests (marker bf16) again as a machine with native bf16 (a GPU, AVX-512 BF16, AMX) runs them.
test: install
	$(BIN)/python -m pytest -q -n auto
	LMFORGE_NATIVE_BF16=1 $(BIN)/python -m pytest -q -n auto -m bf16

# House style: ruff's linter and formatter (configured in pyproject.toml); CI runs this before the tests.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The documentation site (mkdocs.yml, docs/) into site/; --strict: a broken link, an anchor that is not
# there or a page left out of the nav fails the build (tests/docs/test_docs.py builds it too).
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache site
