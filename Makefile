# One definition of the tasks, used by developers, the README and CI (.ci/run).
#   make run    set everything up, then run Sluice on the built-in default configuration
#   make test   set everything up, then run every check and test (lint, cargo, pytest)
# Everything installs itself: Debian packages (as root), a virtual environment in .venv,
# and the Rust extension built by maturin into it.

VENV    ?= .venv
PY      := $(VENV)/bin/python
PYTHON  ?= python3
CONFIG  ?=
PYTEST_ARGS ?=

.PHONY: setup system-packages venv native run test lint rust-test py-test fmt bench-body-store clean

setup: system-packages venv native

system-packages:
	@bash scripts/install-system-packages.sh

$(VENV)/.deps-stamp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "maturin>=1.5,<2" uvloop lmdb msgpack dnspython prometheus-client \
		pytest ruff mypy
	touch $@

venv: $(VENV)/.deps-stamp

# maturin develop is incremental through cargo: a second run with no Rust change is quick.
native: venv
	VIRTUAL_ENV=$(abspath $(VENV)) PATH=$(abspath $(VENV))/bin:$$PATH \
		$(VENV)/bin/maturin develop --release --quiet

run: setup
	$(VENV)/bin/sluice run $(if $(CONFIG),--config $(CONFIG))

lint: setup
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --quiet -- -D warnings
	$(VENV)/bin/ruff check appliance tests bench
	$(VENV)/bin/ruff format --check appliance tests bench
	$(VENV)/bin/mypy

rust-test:
	cargo test --workspace --quiet

py-test: setup
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test: setup lint rust-test py-test

fmt:
	cargo fmt --all
	$(VENV)/bin/ruff format appliance tests bench
	$(VENV)/bin/ruff check --fix appliance tests bench

bench-body-store: setup
	$(PY) bench/body_store.py

clean:
	rm -rf $(VENV) target var
