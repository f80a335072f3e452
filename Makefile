# Tartarus: `make run` and `make test` bootstrap everything from a fresh Debian 12 machine.
SHELL := /bin/bash
.DEFAULT_GOAL := help
export PATH := $(HOME)/.cargo/bin:$(PATH)

VENV    := .venv
PY      := $(VENV)/bin/python
STAMPS  := .stamps
DIST    := dist
# uv installs the locked Python dependencies; it lives in its own small venv, itself
# installed from requirements/uv.txt (pinned with hashes).
TOOLS   := .tools
UV      := $(TOOLS)/bin/uv
# Every stage's time goes to .stamps/stages.tsv; scripts/lanes.py prints them at the end.
STAGE   := scripts/stage
PYTEST_ARGS ?=
export UV_PROJECT_ENVIRONMENT := $(VENV)
export UV_PYTHON_DOWNLOADS := never

RUST_SRC := Cargo.toml Cargo.lock $(shell find rust -type f \( -name '*.rs' -o -name '*.c' -o -name Cargo.toml \) 2>/dev/null)
PY_SRC   := pyproject.toml $(shell find python build_backend -type f \( -name '*.py' -o -name '*.pyi' -o -name py.typed \) -not -path '*/__pycache__/*' 2>/dev/null)
DATA_SRC := $(shell find python -type f -not -name '*.py' -not -name '*.pyi' -not -name '*.so' -not -path '*/_bin/*' -not -path '*/__pycache__/*' 2>/dev/null)

.PHONY: help run test lint typecheck rust-check artefacts runsc pytest bench clean system install lock stage-reset

help:
	@echo "make run    set everything up and run a sandbox on the best backend"
	@echo "make test   set everything up and run the whole suite (per-lane times at the end)"
	@echo "make bench  run the benchmarks (results in benches/results/)"
	@echo "make lock   upgrade the locked Python dependencies (uv.lock, requirements/uv.txt)"

$(STAMPS):
	@mkdir -p $@

$(STAMPS)/system: scripts/bootstrap-system.sh scripts/system-packages.txt | $(STAMPS)
	$(STAGE) system setup -- scripts/bootstrap-system.sh
	@touch $@

$(STAMPS)/tools: requirements/uv.txt $(STAMPS)/system
	test -x $(TOOLS)/bin/python || python3 -m venv $(TOOLS)
	$(STAGE) uv setup -- $(TOOLS)/bin/python -m pip install -q --disable-pip-version-check \
		--require-hashes -r requirements/uv.txt
	@touch $@

# The Python dependencies come from uv.lock only (hashes checked); an out-of-date lock
# stops here and names the command that updates it. Bytecode is compiled at install:
# uv does not by default, and where PYTHONDONTWRITEBYTECODE is set (CI images often set
# it) every Python process would otherwise compile each module it imports, every time
# (the server's imports: 1.7 s uncompiled, 0.7 s compiled).
$(STAMPS)/venv: uv.lock pyproject.toml $(STAMPS)/tools
	UV=$(UV) scripts/check-lock
	test -x $(PY) || $(UV) venv --quiet --python python3 $(VENV)
	$(STAGE) dependencies setup -- $(UV) sync --frozen --extra dev --no-install-project \
		--compile-bytecode --python $(PY)
	@touch $@

# The wheel is what users get: build it with the locked maturin, then install it.
$(STAMPS)/install: $(STAMPS)/venv $(RUST_SRC) $(PY_SRC) $(DATA_SRC)
	rm -rf $(DIST)
	$(STAGE) wheel setup -- $(UV) build --quiet --wheel --no-build-isolation --python $(PY) \
		--out-dir $(DIST)
	$(UV) pip install --quiet --python $(PY) --no-deps --reinstall --compile-bytecode \
		$(DIST)/tartarus-*.whl
	@touch $@

# The one deliberate way to move the Python dependencies: upgrade, then commit.
lock: $(STAMPS)/tools
	$(UV) lock --upgrade
	echo uv | $(UV) pip compile - --upgrade --generate-hashes --no-header --quiet \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 -o requirements/uv.txt
	@echo "lock: review 'git diff uv.lock requirements/uv.txt', run make test, commit both"

system: $(STAMPS)/system
install: $(STAMPS)/install

run: $(STAMPS)/install runsc
	$(VENV)/bin/tartarus doctor
	$(PY) examples/quickstart.py

lint: $(STAMPS)/install
	$(STAGE) ruff setup -- $(VENV)/bin/ruff check .
	$(STAGE) ruff-format setup -- $(VENV)/bin/ruff format --check .

typecheck: $(STAMPS)/install
	$(STAGE) mypy setup -- $(VENV)/bin/mypy

rust-check: $(STAMPS)/system
	$(STAGE) cargo-fmt setup -- cargo fmt --all --check
	$(STAGE) clippy setup -- cargo clippy --workspace --all-targets --locked -- -D warnings
	$(STAGE) cargo-test setup -- scripts/rust-test-probe

# The heavy artefacts tests use, built once and cached by their inputs under
# ~/.cache/tartarus (a cache hit takes a second): runsc, the guest kernel, the templates,
# the templates test servers start with (tests/support/template_seed.py) and the
# nested-KVM L1 (Debian's kernel package plus a small initramfs).
# Built here, not inside a test, so parallel test workers never build them twice.
artefacts: $(STAMPS)/install runsc
	$(STAGE) kernel artefacts -- $(VENV)/bin/tartarus kernel build
	$(STAGE) template-base artefacts -- $(VENV)/bin/tartarus template build base
	$(STAGE) template-python artefacts -- $(VENV)/bin/tartarus template build python
	$(STAGE) template-seed artefacts -- $(PY) -m tests.support.template_seed prepare
	$(STAGE) nested-l1 artefacts -- $(PY) -m tests.support.nested_kvm prepare

# The pinned gVisor runsc (the pin: tartarus.host.runsc.RUNSC_VERSION), built with Go.
runsc: $(STAMPS)/install
	$(STAGE) runsc artefacts -- $(VENV)/bin/tartarus runsc install

# One lane only, or a few tests: make pytest PYTEST_ARGS='tests/test_x.py -k name'
pytest: $(STAMPS)/install
	$(VENV)/bin/pytest $(PYTEST_ARGS)

stage-reset: | $(STAMPS)
	@rm -f $(STAMPS)/stages.tsv

# The pytest lanes run last; their summary (time per stage and lane, then the count of
# every test) ends the output.
test: stage-reset lint typecheck rust-check artefacts
	$(PY) scripts/lanes.py $(PYTEST_ARGS)

bench: $(STAMPS)/install
	@for b in benches/bench_*.py; do [ -e "$$b" ] || continue; echo "== $$b"; $(PY) -m benches.$$(basename $$b .py) || exit 1; done

clean:
	rm -rf $(STAMPS) $(DIST) $(TOOLS) target python/tartarus/_bin
