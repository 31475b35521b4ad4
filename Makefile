# The entry points of the README: `make demo` (the main job, offline), `make app` (the web demo) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install demo app test test-fast lint
install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

demo: install
	$(PY) -m demo.run_demo

# the local web demo on http://127.0.0.1:7860 (the model of `make demo` when there is one, else d16 from the Hub);
# more flags: make app ARGS='--depth 16 --port 7861'
app: install
	$(PY) app.py $(ARGS)

# everything: unit tests, real torchrun / script / kill runs, the notebooks (GPU tests skip without a GPU)
test: install lint
	$(PY) -m pytest -q

# the inner loop: unit tests only (no real processes)
test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(PY) -m ruff check .
