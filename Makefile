# The entry points of the README: `make demo` (the main job, offline), `make app` (the web demo) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install demo app scaling test test-fast test-cell test-matrix bytecode lint
install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

demo: install
	$(PY) -m demo.run_demo

# the scaling laws at toy scale (docs/scaling.md): a family of VAR sizes trained on the demo's Fashion-MNIST and
# tokenizer (made first when demo_output/ lacks them), then fitted and drawn into docs/; about 25 minutes on 2 CPU
# cores for the sweep; not part of `make test`. More flags: make scaling ARGS='--depths 1,2,3 --ep 1'
scaling: install
	$(PY) -m demo.scaling_demo $(ARGS)

# the local web demo on http://127.0.0.1:7860 (the model of `make demo` when there is one, else d16 from the Hub);
# more flags: make app ARGS='--depth 16 --port 7861'
app: install
	$(PY) app.py $(ARGS)

# everything: unit tests, real torchrun / script / kill runs, the notebooks (GPU tests skip without a GPU); the 15
# slowest tests are listed at the end, so that growth shows
test: install lint bytecode
	$(PY) -m pytest -q --durations=15

# the inner loop: unit tests only (no real processes, no end-to-end sweeps)
test-fast: install
	$(PY) -m pytest -q -m "not slow"

# The CPU's vector kernels, as a machine with only these units would run them: PyTorch's own (ATEN_CPU_CAPABILITY)
# and those of the MKL and oneDNN libraries it calls for matrix products and convolutions, which pick theirs apart
KERNELS_default := ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41
KERNELS_avx2 := ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
KERNELS_avx512 := ATEN_CPU_CAPABILITY=avx512 MKL_ENABLE_INSTRUCTIONS=AVX512 ONEDNN_MAX_CPU_ISA=AVX512_CORE
CPU ?= default
THREADS ?= 1

# the unit tests on one kernel set and thread count: make test-cell CPU=default|avx2|avx512 THREADS=1
test-cell: install
	env $(KERNELS_$(CPU)) OMP_NUM_THREADS=$(THREADS) $(PY) -m pytest -q -m "not slow"

# the unit tests on every kernel set this CPU runs with 1 and 2 intra-op threads, then the real-process tests once:
# a tolerance tuned to one machine fails here, not at a user's
test-matrix: install bytecode
	@best=$$($(PY) -c 'import torch; print(torch.backends.cpu.get_cpu_capability().lower())'); \
	case "$$best" in avx512) cpus="default avx2 avx512";; avx2) cpus="default avx2";; *) cpus="default";; esac; \
	for cpu in $$cpus; do for threads in 1 2; do \
		echo "== $$cpu kernels, $$threads intra-op threads: the unit tests"; \
		$(MAKE) --no-print-directory test-cell CPU=$$cpu THREADS=$$threads || exit 1; \
	done; done; \
	echo "== the real-process tests ($$best kernels)"; \
	$(PY) -m pytest -q -m slow

# the project's modules compiled once, so that the tests' real processes (torchrun workers, scripts) read them instead
# of compiling them again each (where PYTHONDONTWRITEBYTECODE keeps Python from caching them itself)
bytecode: install
	$(PY) -m compileall -q -x '/\.venv/|/demo_output/|/local_output/' .

lint: install
	$(PY) -m ruff check .
