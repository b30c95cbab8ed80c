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

.PHONY: setup system-packages venv native run test lint rust-test py-test fmt bench-body-store \
	fuzz fuzz-props isemail-doc bench bench-quick clean

setup: system-packages venv native

system-packages:
	@bash scripts/install-system-packages.sh

$(VENV)/.deps-stamp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "maturin>=1.5,<2" uvloop lmdb msgpack dnspython prometheus-client \
		"flufl.bounce>=6" pytest ruff mypy aiosmtpd
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

# Side-by-side benchmark with Postfix, aiosmtpd and smtp-sink (bench/README.md; ~10 min).
bench: setup
	$(PY) bench/run.py

bench-quick: setup
	$(PY) bench/run.py --quick

bench-body-store: setup
	$(PY) bench/body_store.py

# Fuzzing (not part of `make test`): each target for FUZZ_SECONDS (default 120).
# cargo-fuzz wants nightly features; RUSTC_BOOTSTRAP lets the stable toolchain provide them.
FUZZ_SECONDS ?= 120
fuzz:
	command -v cargo-fuzz >/dev/null || cargo install --quiet cargo-fuzz
	cd fuzz && for t in session address data_decoder bdat; do \
	  RUSTC_BOOTSTRAP=1 cargo fuzz run $$t -- -max_total_time=$(FUZZ_SECONDS) -dict=smtp.dict || exit 1; \
	done

# The fuzz properties as plain tests with many more rounds, on the stable toolchain.
fuzz-props:
	SLUICE_PROP_ROUNDS=20000 cargo test --release -p smtp-proto --test fuzz_props

# Regenerate rust/smtp-proto/docs/isemail.md from the isemail corpus.
isemail-doc:
	SLUICE_WRITE_ISEMAIL_DOC=1 cargo test -p smtp-proto --test isemail

clean:
	rm -rf $(VENV) target var
