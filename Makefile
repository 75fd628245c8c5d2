# Two entry points: `make demo` (the main job) and `make test` (the suite). Both create .venv if needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdir/demo

.PHONY: demo test venv bench bench-rloo faults clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,gguf]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m experiments.pipeline --config=experiments/configs/pipeline.py --workdir=$(WORKDIR)

test: venv
	$(PY) -m pytest -n 2 --dist loadfile -q tests

BENCH_VENV := .venv-bench
BENCH_PY := $(BENCH_VENV)/bin/python

# Peers (torch CPU, transformers, trl 0.29) live in their own venv, never in the library's dependencies.
$(BENCH_VENV)/.installed: setup.py benchmarks/requirements.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PY) -m pip install --quiet --upgrade pip
	$(BENCH_PY) -m pip install --quiet -e .
	$(BENCH_PY) -m pip install --quiet -r benchmarks/requirements.txt
	touch $@

# Every figure of BENCHMARKS.md against the PyTorch peers (1-6 min each on 2 cores)
bench: $(BENCH_VENV)/.installed
	mkdir -p workdir/bench
	set -e; for b in pretrain_step sampling ppo_iteration stage_throughput scaling; do \
	  $(BENCH_PY) -m benchmarks.$$b | tee workdir/bench/$$b.log; done

BENCH_TRL1_VENV := .venv-bench-trl1
BENCH_TRL1_PY := $(BENCH_TRL1_VENV)/bin/python

# TRL 1.x (RLOOTrainer) in a second peer venv: it cannot share .venv-bench with trl 0.29 (PPOTrainer)
$(BENCH_TRL1_VENV)/.installed: setup.py benchmarks/requirements-trl1.txt
	$(PYTHON) -m venv $(BENCH_TRL1_VENV)
	$(BENCH_TRL1_PY) -m pip install --quiet --upgrade pip
	$(BENCH_TRL1_PY) -m pip install --quiet -e .
	$(BENCH_TRL1_PY) -m pip install --quiet -r benchmarks/requirements-trl1.txt
	touch $@

# Our RLOO iteration against TRL 1.x's RLOOTrainer (~2 min on 2 cores)
bench-rloo: $(BENCH_TRL1_VENV)/.installed
	mkdir -p workdir/bench
	$(BENCH_TRL1_PY) -m benchmarks.rloo_iteration | tee workdir/bench/rloo_iteration.log

# SIGKILL / mid-checkpoint-write / NaN / negative-control sweep over all four stages + 2-process runs (~15 min)
faults: venv
	$(PY) -m tests.faults_driver --kills=3 --multihost
	$(PY) -m tests.faults_driver --kills=1 --write_kills=1 --nans=0 --controls=0 --mesh=fsdp=2,tensor=2

clean:
	rm -rf $(VENV) workdir
