# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
# Both create the virtual environment (.venv) on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EMU := $(VENV)/bin/emulator

.PHONY: demo test test-fast bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# The main job: an emulation on an embedded local Ray with a bundled trace, printing results.
demo: $(VENV)/.installed
	$(EMU) emulate --trace traces/reasoning-200.arrow --model llama-3.1-8b --hardware h100 --tp 2 \
		--max-requests 64 --max-output-tokens 128 --dilation 20 -o runs/demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

# Pure tests only (no Ray): seconds.
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not ray"

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_simulator.py

clean:
	rm -rf runs .pytest_cache
