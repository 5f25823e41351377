# needle: the two commands a newcomer runs are `make demo` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
NEEDLE := target/release/needle

.PHONY: all deps build demo test bench fuzz lint fmt docs clean-demo

all: build

## Install what is missing (system packages only where absent).
deps:
	@scripts/setup.sh

## Build target/release/needle (runs with no extra environment).
build: deps
	$(CARGO) build --release --locked -p needle-runner -p needle-models
	@echo "built $(NEEDLE)"

## Build and run the demo recipe; prints where its results are.
demo: build
	@scripts/demo.sh

## Build and run every test (unit, property, snapshot and end-to-end).
test:
	@scripts/setup.sh --test
	NEEDLE_TEST_SLURM=require NEEDLE_TEST_PRIVILEGED=require NEEDLE_TEST_S3=require $(CARGO) test --workspace --locked
	@# The end-to-end tests again, with steps started by the fast spawn where it exists; not
	@# the sweeps of sled's faults, which try the store under a few trivial steps.
	@if [[ $$(uname -s) == Linux && $$(uname -m) =~ ^(x86_64|aarch64)$$ ]]; then \
	  echo "NEEDLE_SPAWN=clone: the end-to-end tests again"; \
	  NEEDLE_SPAWN=clone NEEDLE_TEST_SLURM=require NEEDLE_TEST_PRIVILEGED=require NEEDLE_TEST_S3=require $(CARGO) test --locked -p needle-runner --test e2e -- --skip sled_faults::; \
	fi

## Benchmarks (not tests): see BENCHMARKS.md.
bench: build
	bench/run.sh

## Fuzz recipe parsing and planning for FUZZ_SECONDS (default 300): see scripts/fuzz.sh.
fuzz:
	scripts/fuzz.sh $(or $(FUZZ_SECONDS),300)

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

fmt:
	$(CARGO) fmt --all

## Regenerate docs/reference/ops.md from `needle ops --json` (a test fails when it drifts).
docs:
	UPDATE_DOCS=1 $(CARGO) test --locked --test e2e docs::the_ops_reference

clean-demo:
	rm -rf .needle
