# Tartarus: `make run` and `make test` bootstrap everything from a fresh Debian 12 machine.
SHELL := /bin/bash
.DEFAULT_GOAL := help
export PATH := $(HOME)/.cargo/bin:$(PATH)

VENV    := .venv
PY      := $(VENV)/bin/python
STAMPS  := .stamps
DIST    := dist
PYTEST_ARGS ?=

RUST_SRC := Cargo.toml Cargo.lock $(shell find rust -type f \( -name '*.rs' -o -name Cargo.toml \) 2>/dev/null)
PY_SRC   := pyproject.toml $(shell find python build_backend -type f \( -name '*.py' -o -name '*.pyi' -o -name py.typed \) -not -path '*/__pycache__/*' 2>/dev/null)
DATA_SRC := $(shell find python -type f -not -name '*.py' -not -name '*.pyi' -not -name '*.so' -not -path '*/_bin/*' -not -path '*/__pycache__/*' 2>/dev/null)

.PHONY: help run test lint typecheck rust-check pytest bench clean system install

help:
	@echo "make run    set everything up and run a sandbox on the best backend"
	@echo "make test   set everything up and run the whole suite"
	@echo "make bench  run the benchmarks (results in benches/results/)"

$(STAMPS):
	@mkdir -p $@

$(STAMPS)/system: scripts/bootstrap-system.sh scripts/system-packages.txt | $(STAMPS)
	scripts/bootstrap-system.sh
	@touch $@

$(STAMPS)/venv: pyproject.toml $(STAMPS)/system
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@touch $@

# The wheel is what users get: build it, then install it (with dev extras) into .venv.
$(STAMPS)/install: $(STAMPS)/venv $(RUST_SRC) $(PY_SRC) $(DATA_SRC)
	rm -rf $(DIST)
	$(PY) -m pip wheel -q --no-deps -w $(DIST) .
	$(PY) -m pip install -q --force-reinstall --no-deps $(DIST)/tartarus-*.whl
	$(PY) -m pip install -q "$$(ls $(DIST)/tartarus-*.whl)[dev]"
	@touch $@

system: $(STAMPS)/system
install: $(STAMPS)/install

run: $(STAMPS)/install
	$(VENV)/bin/tartarus doctor
	$(PY) examples/quickstart.py

lint: $(STAMPS)/install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMPS)/install
	$(VENV)/bin/mypy

rust-check: $(STAMPS)/system
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --locked -- -D warnings
	scripts/rust-test-probe

pytest: $(STAMPS)/install
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# pytest runs last so its summary line ends the output.
test: lint typecheck rust-check
	$(MAKE) --no-print-directory pytest

bench: $(STAMPS)/install
	@for b in benches/bench_*.py; do [ -e "$$b" ] || continue; echo "== $$b"; $(PY) -m benches.$$(basename $$b .py) || exit 1; done

clean:
	rm -rf $(STAMPS) $(DIST) target python/tartarus/_bin
