# The two commands of the README: `make demo` (the main job) and `make test`.
# Each creates its own virtual environment in .venv on first use.
PYTHON ?= python3
VENV ?= .venv
# CPU machines: the pinned CPU build of torch (an unpinned `torch` pulls a multi-GB CUDA build).
# GPU machines: override, e.g. `make test TORCH=torch`, or use an environment that has torch already.
TORCH ?= torch==2.13.0
# The GPU image runs triton 3.6; testing against the same release keeps the kernels within it.
TRITON ?= triton==3.6.0
# Triton 3.6's interpreter calls int() on shape-(1,) arrays, which numpy >= 2.4 refuses
# (triton-lang/triton#9171): runtime loop bounds fail in the CPU tests without this pin.
NUMPY ?= numpy<2.4
BIN := $(VENV)/bin

.PHONY: demo test clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)" "$(TRITON)" "$(NUMPY)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/python -m dustin_kernels.generate --demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest -n 2

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
