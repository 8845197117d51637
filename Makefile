# The two commands a newcomer needs: `make run` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A CPU build of torch sits on this machine's disk; an unpinned torch would pull a multi-GB CUDA build.
TORCH := torch==2.13.0
LOCK := requirements.lock
LOCK_TOOLS := .venv-lock
# dvc runs each stage's `python -m tasks.<stage>` through PATH: make that the project's interpreter.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install system-packages lock lock-gpu reference docs run test test-fast lint audit bench bench-tables clean

install: $(VENV)/.installed

# Exactly the versions and files requirements.lock names (hashes checked), then the project itself: two installs
# on two machines get the same set. Then the page `dvc plots` draws into, Vega inside it (.dvc/config). The lock holds the CPU build of torch (`make lock` refreshes it).
$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(BIN)/python || (tools/system-packages venv $(PYTHON) && $(PYTHON) -m venv $(VENV))
	$(BIN)/pip install --quiet --require-hashes --no-deps -r $(LOCK)
	$(BIN)/pip install --quiet --no-deps -e .
	$(BIN)/python -m tools.plots_template
	touch $@

# Refresh requirements.lock after changing pyproject.toml's dependencies: pip-compile (in a venv of its own) pins
# every package of the dev and s3 sets with the hashes of its files; it needs PyPI and takes a quarter of an hour.
# It resolves for the Python it runs on: what only an earlier 3.11 needs is left out (async-timeout, which redis
# needs below 3.11.3; Debian 12's python3 is 3.11.2): put it back with its marker and hashes, as the lock has it
# now; tests/unit/test_infra.py checks the lock against every locked package's needs on Python 3.11.0.
lock:
	test -x $(LOCK_TOOLS)/bin/pip-compile || ($(PYTHON) -m venv $(LOCK_TOOLS) && $(LOCK_TOOLS)/bin/pip install -q pip-tools)
	echo '$(TORCH)+cpu' > $(LOCK_TOOLS)/torch-cpu.txt
	$(LOCK_TOOLS)/bin/pip-compile --quiet --generate-hashes --strip-extras --extra dev --extra s3 --unsafe-package gpt2-pipeline \
		--constraint $(LOCK_TOOLS)/torch-cpu.txt --no-emit-index-url --no-emit-find-links --output-file $(LOCK) \
		pyproject.toml

# Refresh infra/requirements-gpu.lock (the image's CUDA torch and its libraries, hashed) after changing TORCH.
lock-gpu: install
	$(BIN)/python tools/gpu_lock.py

# params.yaml, docs/reference/params.md and params.schema.json from tasks/plumbing/params.py, and
# docs/architecture.md from the code (tests check they are up to date).
reference: install
	$(BIN)/python tools/params_reference.py
	$(BIN)/python tools/architecture.py

# The documentation site (docs/, mkdocs.yml) into site/; --strict fails on a broken link or a page left out.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

run: install
	$(BIN)/dvc repro
	$(BIN)/gpt2-pipeline summary

# Two workers (pytest-xdist), each taking whole modules so a module's shared fixture is built once (faster than
# --dist loadgroup; three workers are slower than two on two cores). Modules go out one at a time,
# longest first, as tests/conftest.py orders and schedules them (PYTEST_ARGS=--store-durations refreshes
# tests/durations.json); tests are in a random order within them (pytest-randomly prints its seed; replay an order
# with PYTEST_ARGS=--randomly-seed=N).
test: install system-packages
	$(BIN)/python -m pytest -n 2 --dist loadscope $(PYTEST_ARGS)

# What the tests need beside Python packages (PostgreSQL, Chromium), installed with apt-get where missing.
system-packages:
	tools/system-packages tests

# The edit-test loop: no model trained through DVC, no servers, on both cores (-n 2: about half the time of one
# process). CI always runs everything (make test).
test-fast: install system-packages
	$(BIN)/python -m pytest -n 2 -m "not slow and not servers" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

# Security: bandit on the project's code (medium and high findings fail), pip-audit on the installed packages
# (tools/audit.py says how many it could check: NOT AUDITED where no vulnerability database answers).
audit: install
	$(BIN)/bandit -q -ll -r tasks flows tools
	$(BIN)/python tools/audit.py

# Every benchmark case this machine can run (tools/bench_tables.py lists them; the GPU case needs a GPU), each
# saving its figures in bench/results/, then docs/benchmarks.md's tables rewritten from them.
bench: install
	$(BIN)/python tools/bench_tables.py --run

# Only docs/benchmarks.md's tables, from bench/results/ (a test checks the page matches).
bench-tables: install
	$(BIN)/python tools/bench_tables.py

clean:
	rm -rf data/prepared data/tokenized models checkpoints registered.json mlflow.db mlartifacts
