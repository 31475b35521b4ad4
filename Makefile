# The entry points of the README: `make demo` (the main job, offline), `make app` (the web demo) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install demo app test test-fast test-matrix lint
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

# everything: unit tests, real torchrun / script / kill runs, the notebooks (GPU tests skip without a GPU); the 15
# slowest tests are listed at the end, so that growth shows
test: install lint
	$(PY) -m pytest -q --durations=15

# the inner loop: unit tests only (no real processes)
test-fast: install
	$(PY) -m pytest -q -m "not slow"

# the unit tests under every CPU kernel set of PyTorch this CPU runs (generic, AVX2, AVX-512) with 1 and 2 intra-op
# threads, then the real-process tests once: a tolerance tuned to one machine fails here, not at a user's
test-matrix: install
	@caps="default"; \
	best=$$($(PY) -c 'import torch; print(torch.backends.cpu.get_cpu_capability().lower())'); \
	case "$$best" in avx2) caps="default avx2";; avx512) caps="default avx2 avx512";; esac; \
	for cap in $$caps; do for threads in 1 2; do \
		echo "== ATEN_CPU_CAPABILITY=$$cap OMP_NUM_THREADS=$$threads: the unit tests"; \
		ATEN_CPU_CAPABILITY=$$cap OMP_NUM_THREADS=$$threads $(PY) -m pytest -q -m "not slow" || exit 1; \
	done; done; \
	echo "== the real-process tests ($$best kernels, default threads)"; \
	$(PY) -m pytest -q -m slow

lint: install
	$(PY) -m ruff check .
