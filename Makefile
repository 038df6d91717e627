# Set-up and entry points. `make demo` and `make test` work from a fresh clone:
# they create .venv, install torch==2.13.0 first (CPU build here), then sapwood with dev extras.
# On a machine that already has torch (e.g. a GPU box): make test PYTHON=python3
VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test lint unit distributed clean

ifeq ($(PYTHON),$(VENV)/bin/python)
install: $(STAMP)
$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q torch==$(TORCH_VERSION)
	$(VENV)/bin/python -m pip install -q -e ".[dev]"
	touch $(STAMP)
else
install:
	$(PYTHON) -m pip install -q -e ".[dev]"
endif

demo: install
	$(PYTHON) -m sapwood.cli demo

lint: install
	$(PYTHON) -m ruff check sapwood tests

test: lint
	OMP_NUM_THREADS=2 $(PYTHON) -m pytest -q tests

distributed: install
	$(PYTHON) -m pytest -q -m distributed tests

clean:
	rm -rf $(VENV) build *.egg-info
