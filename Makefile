# Set-up and the two everyday commands; each creates the virtual environment when missing.
#   make bench   run `fastsam bench` on its built-in default (random-weight SAM vit_b)
#   make test    run the test suite (tests/ and bench/, small configs on a CPU)

PYTHON ?= python3
VENV ?= .venv
# torchvision imports only beside its matching torch; this pair lies on the local disk of the
# project's x86-64 machines and is what segment_anything and sam2 need.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PIP = $(VENV)/bin/python -m pip

.PHONY: bench test setup clean

setup: $(VENV)/.installed

# torch first, then the rest without build isolation: sam2 is an sdist whose build imports
# torch (isolation would install a second torch) and, with SAM2_BUILD_CUDA=0, skips its
# optional CUDA extension.
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip>=23" "setuptools>=77"
	$(PIP) install --quiet $(TORCH_SPEC)
	SAM2_BUILD_CUDA=0 $(PIP) install --quiet --no-build-isolation -e ".[test]"
	touch $@

bench: setup
	$(VENV)/bin/fastsam bench

test: setup
	$(VENV)/bin/python -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks *.egg-info
