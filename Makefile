# QLoRA from Scratch: the two commands are `make book` and `make test`.
# Each creates (or updates) the virtual environment .venv and installs what it needs.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --constraint constraints.txt
# On a machine without an NVIDIA GPU, take PyTorch's CPU build (about 200 MB) rather than PyPI's
# Linux default, which brings several GB of CUDA libraries. Set TORCH_INDEX= to use PyPI's build.
TORCH_INDEX ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,https://download.pytorch.org/whl/cpu)
NBVAL := --nbval --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-current-env
export PYTHONHASHSEED := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: help env book student assignments slides notebooks save experiments test test-floors lint unit nbval browser bench clean

help:
	@echo "make book       build the book into _build/html (stored notebook outputs, warnings are errors)"
	@echo "make test       lint, unit/property tests, every notebook under nbval, the book, a browser check"
	@echo "make notebooks  re-execute every notebook top to bottom and store its outputs"
	@echo "make save       write the modules the chapters teach from their # @save cells"
	@echo "make experiments  run Chapter 8's experiment grids and store their results"
	@echo "make student    the student edition (no solutions) into _build/student"
	@echo "make assignments  per chapter, the notebook to hand out and its otter-grader autograder"
	@echo "make slides     one reveal.js deck per chapter into _build/slides (opens offline)"
	@echo "make bench      benchmarks against bitsandbytes (not part of the tests)"
	@echo "make test-floors  every notebook's asserts with the lowest versions pyproject.toml allows"

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || { \
	  if [ -n "$(TORCH_INDEX)" ]; then \
	    $(PIP) --no-deps --retries 0 --index-url $(TORCH_INDEX) torch || $(PIP) --no-deps torch; \
	  fi; }
	$(PIP) -e ".[book,test]"
	touch $@

# A changed table of contents or configuration changes every page's navigation: rebuild them all.
STALE := $(shell find _toc.yml _config.yml -newer _build/html/.buildinfo 2>/dev/null)

book: env
	$(VENV)/bin/jupyter-book build . -W -n --keep-going $(if $(STALE),--all)

student: env
	$(PY) scripts/student_edition.py

# _build/assignments/<chapter>/: the notebook to hand out and autograder.zip (book/instructors.md)
assignments: env
	$(PY) scripts/assignments.py

slides: env
	$(PY) scripts/slides.py

notebooks: env
	$(PY) scripts/run_notebooks.py notebooks/*.ipynb

# The chapters are the source of the modules they teach (tests/test_export.py checks they agree).
save: env
	$(PY) scripts/export_package.py

lint: env
	$(VENV)/bin/ruff check qlora_edu tests benchmarks scripts notebooks
	$(VENV)/bin/ruff format --check qlora_edu tests benchmarks scripts notebooks

unit: env
	$(PY) -m pytest tests -m "not browser"

# The stored outputs are made natively (often with AVX-512); nbval re-executes the notebooks with
# PyTorch's CPU kernels limited to AVX2 (scripts/avx2.py), so they must not depend on either. It
# prints each notebook's time and fails one far over its 5-minute budget (notebooks/conftest.py).
nbval: env
	$(PY) scripts/avx2.py $(PY) -m pytest $(NBVAL) notebooks

browser: book student slides
	$(PY) -m pytest tests -m browser

test: lint unit nbval browser

# Chapter 8's experiment grids (minutes on 2 idle cores), committed in qlora_edu/assets/experiments/
experiments: env
	$(PY) scripts/experiments.py

bench: env
	$(PY) benchmarks/quantize.py
	$(PY) benchmarks/qlora_linear.py

# The floors: a second environment with the libraries at the lowest versions pyproject.toml allows
# (constraints-floors.txt); every notebook must run top to bottom (outputs may differ, asserts not).
FLOORS := .venv-floors
FLOORS_PIP := $(FLOORS)/bin/python -m pip install --quiet --constraint constraints-floors.txt

$(FLOORS)/.installed: pyproject.toml constraints-floors.txt
	test -x $(FLOORS)/bin/python || $(PYTHON) -m venv $(FLOORS)
	$(if $(TORCH_INDEX),$(FLOORS_PIP) --retries 0 --index-url $(TORCH_INDEX) torch ||) $(FLOORS_PIP) torch
	$(FLOORS_PIP) -e . ipykernel nbclient
	touch $@

test-floors: $(FLOORS)/.installed
	$(FLOORS)/bin/python scripts/check_floors.py

clean:
	rm -rf _build
