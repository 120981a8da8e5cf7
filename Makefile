# The two set-up commands of the README:
#   make demo   - install (and the aarch64 cross compiler), then prune + compile the bundled demo model for the host and a Raspberry Pi 4, run, benchmark
#   make test   - install with test extras and system packages, then run the whole test suite
PY ?= python3
PIP := $(PY) -m pip
# CPU build of PyTorch (only the MiniLM export needs it); without this pin pip picks a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: install install-test system-deps demo test

install:
	$(PIP) install -q -e .

install-test:
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[test]"

system-deps:
	./scripts/install-system-deps.sh

demo: install
	./scripts/install-system-deps.sh g++-aarch64-linux-gnu
	edge-sparse demo -o out/demo --force

test: system-deps install-test
	$(PY) -m pytest -q -ra
