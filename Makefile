# Two commands cover a fresh machine:
#   make quickstart   set up .venv, tokenize pg19-mini, train the tiny model on the CPU
#   make test         set up .venv and run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup quickstart test
setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

quickstart: setup
	PYTHON=$(PY) bash launch/quickstart.sh

test: setup
	$(PY) -m pytest
