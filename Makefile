# vqlab: `make lab` opens the notebooks in JupyterLab, `make test` runs the whole suite.
# Both create the virtual environment on first use (VENV=path to use another one).
VENV ?= .venv
PY   := $(VENV)/bin/python
PORT ?= 8888
IP   ?= 127.0.0.1
STAMP := $(VENV)/.vqlab-installed
# JupyterLab refuses to run as root without --allow-root; no browser when there is no display.
LAB_FLAGS := $(if $(filter 0,$(shell id -u)),--allow-root) $(if $(DISPLAY),,--no-browser)

.PHONY: venv lab test test-unit test-notebooks bench clean-venv

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	@touch $(STAMP)

venv: $(STAMP)

lab: venv
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks --ip=$(IP) --port=$(PORT) $(LAB_FLAGS)

# Unit tests, then every notebook and every exercise solution (notebooks/solutions/) under nbval in fast mode
# (lax: only cells marked NBVAL_CHECK_OUTPUT are compared).
NOTEBOOKS := $(wildcard notebooks/*.ipynb) $(wildcard notebooks/solutions/*.ipynb)
test: venv
	@test -d /usr/share/datasets/fashion-mnist -o -n "$$VQLAB_DATA" || echo "note: no Fashion-MNIST here: the notebooks run on the digits set and its tests skip (sudo apt-get install -y dataset-fashion-mnist)"
	VQLAB_FAST=1 $(PY) -m pytest -p no:cacheprovider tests $(NOTEBOOKS) --nbval-lax --durations=10

test-unit: venv
	$(PY) -m pytest tests

test-notebooks: venv
	VQLAB_FAST=1 $(PY) -m pytest -p no:cacheprovider $(NOTEBOOKS) --nbval-lax

bench: venv
	$(PY) benchmarks/kmeans.py
	$(PY) benchmarks/kernel.py --quick
	$(PY) benchmarks/simd.py --rounds 5
	$(PY) benchmarks/models.py

clean-venv:
	rm -rf $(VENV)
