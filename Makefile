# LoRA Internals: make book | make test | make notebooks | make bench
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BOOK_DEPS := $(VENV)/.book-deps
DEV_DEPS := $(VENV)/.dev-deps
# The environment stored outputs are made and checked in: quick scale, CPU, no progress bars.
NB_ENV := TQDM_DISABLE=1 LORA_EDU_SCALE=quick CUDA_VISIBLE_DEVICES= PYTHONHASHSEED=0
NBVAL := --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg

.PHONY: book test notebooks bench lint unit nbval site-check chromium clean

$(BOOK_DEPS): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

$(DEV_DEPS): $(BOOK_DEPS) requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	touch $@

book: $(BOOK_DEPS)  ## build the site from the stored notebook outputs
	$(VENV)/bin/jupyter-book build . --warningiserror --keep-going
	@echo "The book is at file://$(CURDIR)/_build/html/index.html"

notebooks: $(BOOK_DEPS)  ## re-run notebooks (NB="01 03" for some) at the quick scale, store outputs
	$(NB_ENV) $(PY) scripts/notebooks.py $(NB)

lint: $(DEV_DEPS)
	$(VENV)/bin/ruff check lora_edu tests scripts benchmarks book/_ext conftest.py
	$(VENV)/bin/ruff format --check lora_edu tests scripts benchmarks book/_ext conftest.py

unit: $(DEV_DEPS) chromium
	$(NB_ENV) $(PY) -m pytest tests -q

nbval: $(DEV_DEPS)
	$(NB_ENV) $(PY) -m pytest $(NBVAL) notebooks -q

chromium:
	@command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium)

bench: $(DEV_DEPS)  ## measure ratios (lora_edu vs PEFT / bitsandbytes, notebook times); writes the appendix table
	$(PY) -m benchmarks.run

site-check: $(DEV_DEPS) chromium
	$(PY) tests/site/check_site.py _build/html

test: lint unit nbval book site-check  ## everything CI checks
	@echo "make test: all checks passed"

clean:
	rm -rf _build
