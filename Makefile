# Two entry points: `make train` and `make test`; both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch/torchvision pins that match the wheels most machines here have cached;
# any torch>=2.3 works (see pyproject.toml).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install train test test-fast bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(TORCH_PINS)
	$(PY) -m pip install -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# On a machine without a GPU, unless ARGS chooses a model or an experiment, `make train` trains
# the CPU speedrun (experiment=speedrun: about 90% on CIFAR-10 with 0.2 PFLOP of training; times per CPU in
# docs/speedrun.md) instead of the default model (attention_net). `python train.py` itself is unchanged.
CPU_DEFAULT_ARGS ?= experiment=speedrun

train: install
	@case " $(ARGS)" in *" model="*|*" experiment="*|*" +experiment="*) chosen=1 ;; *) chosen=0 ;; esac; \
	if [ $$chosen = 0 ] && ! $(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
		echo "No GPU found: training the CPU speedrun ($(CPU_DEFAULT_ARGS)); choose model=... or experiment=... in ARGS for another."; \
		$(PY) train.py $(CPU_DEFAULT_ARGS) $(ARGS); \
	else \
		$(PY) train.py $(ARGS); \
	fi


# Tests run on one worker per core plus one (pytest-xdist, at most 8 workers): a worker also waits on
# the processes, servers and clusters its tests start, and the extra worker fills those waits (2-core
# Zen 3, `make test`: the cores were busy 80% of the suite's wall time with 2 workers, 87% with 3;
# times in README.md, "Tests").
# Each test module stays on one worker, so the runs a module trains once are shared by its tests.
# Modules go out heaviest first (tests/conftest.py, pytest_collection_modifyitems), not in xdist's
# order by number of tests, which sent the few long tests of the cluster, chaos and multinode modules
# last.
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; print(min(8, len(os.sched_getaffinity(0)) + 1))")
PYTEST_PARALLEL = -n $(TEST_WORKERS) --dist loadscope

# The whole suite (what CI runs).
test: install
	$(PY) -m pytest $(PYTEST_PARALLEL) $(ARGS)

# The quick tier: unit and in-process tests; no command, cluster, server or multi-process run.
test-fast: install
	$(PY) -m pytest $(PYTEST_PARALLEL) -m "not slow" $(ARGS)

bench: install
	$(PY) -m cifar_lab.bench $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun logs
