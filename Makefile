# Bulkhead — top-level entry points. A newcomer needs only two:
#   make quickstart   install what is needed, build, run the main story
#   make test         install what is needed, run every test
SHELL := /bin/bash
CARGO ?= cargo
export CARGO_TARGET_DIR ?= $(CURDIR)/target
GUEST_DIR := $(CARGO_TARGET_DIR)/guest

.PHONY: quickstart test deps build guest bench lint fmt fuzz-smoke clean-guest-cache

deps:
	@scripts/install-deps.sh

build:
	$(CARGO) build --release --workspace --bins

guest:
	@scripts/build-guest.sh "$(GUEST_DIR)"

quickstart: deps guest build
	@scripts/quickstart.sh

test: deps guest
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --release -- -D warnings
	$(CARGO) build --release --workspace --bins
	BULKHEAD_GUEST_DIR=$(GUEST_DIR) $(CARGO) test --release --workspace -- --test-threads=2
	scripts/with-postgres.sh $(CARGO) test --release -p bulkhead-control pg:: -- --test-threads=1
	@scripts/fuzz-smoke.sh

bench: deps guest build
	@scripts/bench.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --release -- -D warnings

fmt:
	$(CARGO) fmt --all
