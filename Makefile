# `make demo`: set up and run the main job; `make test`: set up and run the test suite;
# `make test-fast`: the same without the tests that start a model app or use Slurm (marked slow);
# `make gpu-check` on a GPU node: the CUDA-only tests and the GPU benchmark.
# Each creates .venv when it is missing and installs what it needs, at the versions of constraints.txt:
# those the whole suite was last green with. `make constraints` runs the suite and, when it passes,
# writes the versions installed in .venv there. `make test-lowest` runs the fast tier in .venv-lowest, with
# ibq's dependencies at the lower bounds of pyproject.toml (constraints-lowest.txt).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch first, at the version constraints.txt pins (and this machine's pip constraint allows).
TORCH := torch torchvision
CONSTRAINTS := constraints.txt
# pytest-xdist: each test file runs whole in one worker (its module fixtures are made once), and the
# workers keep both cores of a 2-core machine busy, where one process of one-thread app runs used 1.2.
WORKERS ?= 2
PARALLEL := -n $(WORKERS) --dist loadfile
VENV_LOWEST := .venv-lowest
STAMP_LOWEST := $(VENV_LOWEST)/.installed

.PHONY: demo test test-fast test-lowest install constraints slurm-up slurm-down slurm-status bench gpu-check clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) $(TORCH)
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/ibq-train

test: $(STAMP)
	$(BIN)/python -m pytest $(PARALLEL)

test-fast: $(STAMP)
	$(BIN)/python -m pytest $(PARALLEL) -m "not slow" --strict-markers

$(STAMP_LOWEST): pyproject.toml constraints-lowest.txt
	test -x $(VENV_LOWEST)/bin/python || $(PYTHON) -m venv $(VENV_LOWEST)
	$(VENV_LOWEST)/bin/python -m pip install --quiet --upgrade pip
	$(VENV_LOWEST)/bin/pip install --quiet -c constraints-lowest.txt setuptools wheel   # the build backend's bound, for builds without isolation
	$(VENV_LOWEST)/bin/pip install --quiet -c constraints-lowest.txt $(TORCH)
	$(VENV_LOWEST)/bin/pip install --quiet -c constraints-lowest.txt -e '.[test]'
	touch $(STAMP_LOWEST)

test-lowest: $(STAMP_LOWEST)
	$(VENV_LOWEST)/bin/python -m pytest -m "not slow"

# Only after a green suite: the versions in .venv become the constraints (ibq itself left out).
constraints: test
	{ echo "# The versions the whole test suite (make test) last passed with; written by make constraints."; \
	  $(BIN)/pip freeze --exclude-editable | grep -v -i '^ibq=='; } > $(CONSTRAINTS).tmp
	mv $(CONSTRAINTS).tmp $(CONSTRAINTS)

slurm-up:
	bash scripts/slurm.sh up

slurm-down:
	bash scripts/slurm.sh down

slurm-status:
	bash scripts/slurm.sh status

bench: $(STAMP)
	$(BIN)/python -m benchmarks.bench_train

# On a GPU node: the CUDA-only tests and bench_gpu, logs in gpu-check/ (BASELINE=<git ref> compares).
gpu-check: $(STAMP)
	BASELINE=$(BASELINE) PYTHON=$(BIN)/python bash scripts/gpu_check.sh gpu-check

clean:
	rm -rf outputs multirun gpu-check
