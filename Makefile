# modelpatch: `make main` runs the miniature transfer study, `make test` runs the test suite.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
RUN ?= runs/main
QUIET := extras.print_config=false  # progress: a bar on a terminal, a line per epoch otherwise

.PHONY: main test test-fast setup system-deps lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,cluster]'
	touch $@

system-deps:
	bash scripts/install-system-deps.sh

## The miniature of the paper's transfer table (docs/results.md): pretrain on Fashion-MNIST 0-4,
## then one patch per run on 1,000 images of classes 5-9, then the table and plot.
main: setup system-deps
	rm -rf $(RUN)
	$(PY) train.py experiment=pretrain_fmnist_a hydra.run.dir=$(RUN)/pretrain $(QUIET)
	$(PY) train.py -m experiment=transfer_fmnist_b patch=logits,bn,dw,bn+dw,full \
		backbone.weights=$(RUN)/pretrain/checkpoints/last.ckpt hydra.sweep.dir=$(RUN)/transfer $(QUIET)
	$(PY) -m modelpatch.report $(RUN)/transfer

test: setup system-deps
	bash scripts/slurm-local.sh
	$(PY) -m pytest

## The edit-test loop: every test of one process (no train.py subprocess, DDP, SLURM, pool or install).
test-fast: setup system-deps
	$(PY) -m pytest -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf runs outputs multirun .pytest_cache .ruff_cache
