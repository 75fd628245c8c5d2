# Two entry points: `make demo` (the main job) and `make test` (the suite). Both create .venv if needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdir/demo

.PHONY: demo test venv bench faults clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m experiments.pipeline --config=experiments/configs/pipeline.py --workdir=$(WORKDIR)

test: venv
	$(PY) -m pytest -n 2 --dist loadfile -q tests

# SIGKILL / mid-checkpoint-write / NaN / negative-control sweep over all four stages + 2-process runs (~15 min)
faults: venv
	$(PY) -m tests.faults_driver --kills=3 --multihost

clean:
	rm -rf $(VENV) workdir
