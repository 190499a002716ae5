# The two commands a new user needs: `make demo` and `make test`. Both install libtorch
# (PyPI's torch==2.11.0, outside the repository) and build what they need, idempotently.

SHELL := /bin/bash
CARGO ?= cargo
CONFIG ?= pipelines/synth.toml
# cargo's target dir (CI keeps one in a cache outside the clone).
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
BIN := $(TARGET_DIR)/release/adamcu

# libtorch: found (or installed once) by the setup script unless the caller set LIBTORCH.
ifeq ($(strip $(LIBTORCH)),)
export LIBTORCH := $(shell ./scripts/setup-libtorch.sh)
endif
ifeq ($(strip $(LIBTORCH)),)
$(error libtorch set-up failed: run ./scripts/setup-libtorch.sh to see why)
endif

# Python of the libtorch virtualenv, for the reference scripts in bench/reference/.
REF_PYTHON := $(abspath $(LIBTORCH)/../../../../bin/python)

.PHONY: build sys-deps demo test test-deps lint doctor bench-loader
# The demo's charts (plotters) draw text in a system font found through fontconfig: its and
# FreeType's headers at build time (Debian: libfontconfig1-dev, libfreetype-dev, which bring a
# font), installed with apt-get if missing (sudo when not root). Data-parallel training builds
# c10d's ProcessGroupGloo, whose header needs Gloo's headers: Debian's libgloo-dev (the headers
# only; the Gloo that runs is libtorch's own copy).
sys-deps:
	@{ pkg-config --exists fontconfig freetype2 2>/dev/null && [ -f /usr/include/gloo/rendezvous/store.h ]; } || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends \
	    pkg-config libfontconfig1-dev libfreetype-dev fonts-dejavu-core libgloo-dev; }

build: sys-deps
	$(CARGO) build --release --locked
ifneq ($(TARGET_DIR),target)
	mkdir -p target/release && ln -sf "$(abspath $(BIN))" target/release/adamcu
endif

doctor: build
	./target/release/adamcu doctor

# The main job on the embedded default (the synthetic benchmark).
demo: build
	./target/release/adamcu demo --config $(CONFIG)

# The monitoring test runs a real Prometheus server: Debian's `prometheus` package. The step
# benchmark's test runs bench/reference/ada_mcu_step.py, which builds torchvision's ResNet-101;
# the eval test runs the Cityscapes evaluation scripts (PyPI cityscapesscripts) as the reference.
test-deps:
	$(REF_PYTHON) -m pip install --quiet --disable-pip-version-check torchvision==0.26.0 cityscapesscripts==2.3.0
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends prometheus; }

# One formatting (rustfmt.toml), no clippy warning, no import cycle between modules.
lint:
	@command -v cargo-clippy >/dev/null && command -v rustfmt >/dev/null || rustup component add clippy rustfmt
	$(CARGO) fmt --check
	$(CARGO) clippy --release --locked --all-targets -- -D warnings
	python3 scripts/module-cycles.py

test: build test-deps lint
	$(CARGO) test --release --locked -- --test-threads=2

# Loader throughput against bench/reference/loader_bench.py (PIL + torch) in the same run.
bench-loader: build
	$(REF_PYTHON) -m pip install --quiet --disable-pip-version-check numpy pillow
	./target/release/adamcu bench loader --python $(REF_PYTHON)
