# The two entry points of the README: `make demo` (the main job, offline) and `make test` (the CPU suite).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install demo test
install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

demo: install
	$(PY) -m demo.run_demo

test: install
	$(PY) -m pytest -q tests
