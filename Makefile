# Two entry points for a fresh machine: `make quickstart` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: quickstart test test-slow install clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch/torchvision first and pinned: these exact releases are served locally on the project's machines.
$(STAMP): $(PY) setup.cfg pyproject.toml
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test,torchattacks,robustbench]'
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(PY) -m robustbench_conn.cli.quickstart --out results/quickstart

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

clean-venv:
	rm -rf $(VENV)
