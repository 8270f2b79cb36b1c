# modelpatch: `make main` runs the miniature transfer study, `make test` runs the test suite.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
RUN ?= runs/main
QUIET := extras.print_config=false  # progress: a bar on a terminal, a line per epoch otherwise

LOCK := requirements.lock

.PHONY: main test test-fast setup system-deps lock lock-upgrade lint clean

setup: $(VENV)/.installed

## The tested versions from $(LOCK) (pip's own included), each checked against its sha256, then this checkout
## editable without dependencies: pyproject's ranges are for those who pip install modelpatch elsewhere.
$(VENV)/.installed: pyproject.toml $(LOCK) src/modelpatch/models/_masks.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --require-hashes -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .  # built with the locked setuptools
	touch $@

## $(LOCK): pyproject's dependencies with the dev and cluster extras, and pip, pinned with hashes by pip-compile
## (pip-tools, in its own venv; it uses pip's internals, so the pair below is the one checked together).
## lock re-resolves within pyproject's ranges, keeping the pins that still fit; lock-upgrade takes the newest.
## Then run make test (tests/test_lock.py checks the lock against pyproject and the installed versions).
LOCK_VENV ?= .venv-lock
LOCK_TOOLS := pip==26.3 pip-tools==7.7.0
PIP_COMPILE := $(LOCK_VENV)/bin/pip-compile

$(PIP_COMPILE):
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q $(LOCK_TOOLS)

lock: $(PIP_COMPILE)
	echo pip | CUSTOM_COMPILE_COMMAND="make lock" $(PIP_COMPILE) -q $(LOCK_ARGS) --generate-hashes --allow-unsafe \
		--strip-extras --extra dev --extra cluster --no-emit-index-url --no-emit-find-links -o $(LOCK) pyproject.toml -

lock-upgrade:
	$(MAKE) lock LOCK_ARGS=--upgrade

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

## Two workers (pytest-xdist), each with its share of the cores (tests/conftest.py): one test's imports, SLURM
## waits and DDP rendezvous overlap the other's work. The SLURM tests share one worker; so do a docs block's commands.
TEST_WORKERS ?= 2

test: setup system-deps
	bash scripts/slurm-local.sh
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup

## The edit-test loop: every test of one process (no train.py subprocess, DDP, SLURM, pool or install).
test-fast: setup system-deps
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf runs outputs multirun .pytest_cache .ruff_cache
