# `make demo`: set up and run the main job; `make test`: set up and run the test suite;
# `make test-fast`: the same without the tests that start a model app or use Slurm (marked slow).
# Both create .venv when it is missing and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pip takes the torch wheels that lie on this machine's disk (a pip constraint keeps it there).
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-fast install slurm-up slurm-down slurm-status bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/ibq-train

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" --strict-markers

slurm-up:
	bash scripts/slurm.sh up

slurm-down:
	bash scripts/slurm.sh down

slurm-status:
	bash scripts/slurm.sh status

bench: $(STAMP)
	$(BIN)/python -m benchmarks.bench_train

clean:
	rm -rf outputs multirun
