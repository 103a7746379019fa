# infergate: two commands on a fresh machine.
#   make run   - install what is missing, build release, start the gateway (embedded default config)
#   make test  - install what is missing, run every test tier, lint and format checks
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

PYTHON ?= python3
# The interpreter the `embedded` pool kind links (pyo3): the one the venv is made from.
export PYO3_PYTHON ?= $(shell command -v $(PYTHON))
VENV := .venv
VPY := $(VENV)/bin/python
STAMPS := .stamps
WORKER_SRC := $(shell find python-worker/src/infergate_worker -name '*.py') python-worker/pyproject.toml python-worker/setup.py $(wildcard proto/infergate/v1/*.proto)

.PHONY: run test bench profile venv build build-release test-rust test-python test-deploy lint fmt clean help redis-server prometheus chromium screenshots

help:
	@echo "make run   - start the gateway on 127.0.0.1:8080 (REST) and :50051 (gRPC)"
	@echo "make test  - unit, integration and end-to-end tests, clippy, rustfmt, ruff"
	@echo "make bench - benchmark scenarios side by side (SCENARIO=name for one)"
	@echo "make profile SCENARIO=tiny RATE=4000 TAG=before - flamegraphs of the gateway and its worker under load"

# The worker venv: the SDK (stubs generated from proto/ at install), the
# MiniLM example's PyTorch stack, and test tools. torch comes from PyPI
# (~3 GB with its CUDA libraries); pip's cache makes reinstalls fast.
$(STAMPS)/venv: $(WORKER_SRC)
	@mkdir -p $(STAMPS)
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet "setuptools>=68" "grpcio-tools==1.85.1"
	$(VPY) -m pip install --quiet --no-build-isolation -e "python-worker[minilm,rag,dev,baseline]"
	@touch $@

venv: $(STAMPS)/venv

# Plotting for the benchmarks only; `make test` does not need it.
$(STAMPS)/venv-bench: $(STAMPS)/venv
	$(VPY) -m pip install --quiet --no-build-isolation -e "python-worker[minilm,rag,dev,baseline,bench]"
	@touch $@

build-release:
	cargo build --release --locked -p infergate

build:
	cargo build --locked -p infergate

# Side-by-side scenarios (benches/scenarios.py); SCENARIO=name runs one.
bench: $(STAMPS)/venv-bench
	cargo build --release --locked -p infergate -p infergate-benches --bin infergate --bin infergate-bench --bin infergate-ceiling --bin infergate-allocs --bin infergate-video
	$(VPY) benches/scenarios.py $(SCENARIO)

# CPU profiles under load (benches/profile.py: perf + inferno for the gateway,
# py-spy for its worker), e.g. make profile SCENARIO=tiny RATE=4000 TAG=before
profile: $(STAMPS)/venv-bench .tools/bin/inferno-flamegraph
	cargo build --release --locked -p infergate -p infergate-benches --bin infergate --bin infergate-bench
	cd benches && ../$(VPY) profile.py $(SCENARIO) --rate $(RATE) --tag $(or $(TAG),now)

.tools/bin/inferno-flamegraph:
	cargo install --locked --quiet --root .tools inferno

run: venv build-release
	./target/release/infergate serve

# The policy tests start private redis-server instances (Debian's package).
redis-server:
	@command -v redis-server >/dev/null || { \
		echo "installing redis-server (Debian package) for the policy tests"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server >/dev/null; }

# The observability tests run Debian's Prometheus against a live gateway;
# promtool checks the committed scrape config.
prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
		echo "installing prometheus (Debian package) for the observability tests"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

# The console tests drive Debian's Chromium headless (Playwright, from the
# venv, launches it as installed: no browser download).
chromium:
	@command -v chromium >/dev/null || { \
		echo "installing chromium (Debian package) for the console tests"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium fonts-dejavu-core >/dev/null; }

# The README's screenshots of the console (docs/img/console-*.png), taken by
# its browser test against the default models.
screenshots: venv build chromium
	INFERGATE_BIN=$(CURDIR)/target/debug/infergate INFERGATE_PYTHON=$(CURDIR)/$(VPY) INFERGATE_SCREENSHOTS=$(CURDIR)/docs/img \
		cargo test --locked -p infergate-e2e --test console -- the_console_shows

test-rust: venv build redis-server prometheus chromium
	INFERGATE_BIN=$(CURDIR)/target/debug/infergate INFERGATE_PYTHON=$(CURDIR)/$(VPY) \
		cargo test --locked --workspace --all-targets

# Compose file, Kubernetes manifests, Prometheus and Grafana files, checked
# against their schemas and tools (no Docker or cluster here).
test-deploy: venv build prometheus
	INFERGATE_BIN=$(CURDIR)/target/debug/infergate $(VPY) -m pytest -q -p no:cacheprovider tests/deploy

test-python: venv
	cd python-worker && ../$(VPY) -m pytest -q
	cd benches/baseline && ../../$(VPY) -m pytest -q -p no:cacheprovider

lint: venv
	cargo fmt --all -- --check
	cargo clippy --locked --workspace --all-targets -- -D warnings
	# The gateway without Python (no `embedded` pool kind) builds too.
	cargo clippy --locked -p infergate --no-default-features -- -D warnings
	cd python-worker && ../$(VPY) -m ruff check . ../benches/baseline ../benches/scenarios.py ../benches/profile.py ../benches/models ../tests/workers ../tests/author ../tests/clients ../tests/deploy ../tests/console && ../$(VPY) -m ruff format --check . ../benches/baseline ../benches/scenarios.py ../benches/profile.py ../benches/models ../tests/workers ../tests/author ../tests/clients ../tests/deploy ../tests/console

test: lint test-python test-deploy test-rust

fmt:
	cargo fmt --all
	cd python-worker && ../$(VPY) -m ruff format . ../benches/baseline ../benches/scenarios.py ../benches/profile.py ../benches/models ../tests/workers ../tests/author ../tests/clients ../tests/deploy ../tests/console && ../$(VPY) -m ruff check --fix . ../benches/baseline ../benches/scenarios.py ../benches/profile.py ../benches/models ../tests/workers ../tests/author ../tests/clients ../tests/deploy ../tests/console

clean:
	cargo clean
	rm -rf $(STAMPS)
