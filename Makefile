# barlow: the few commands a developer needs. `make demo` and `make test` set everything up themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-fast lint demo image images-ci clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## a virtual environment in .venv with barlow installed (editable)

test: $(STAMP)  ## the whole suite, slow end-to-end tests included
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)  ## everything but the slow end-to-end tests
	$(BIN)/python -m pytest -q -m "not slow"

demo: $(STAMP)  ## the README's first command: demo images, pretrain, linear eval, on the CPU in minutes
	$(BIN)/barlow data demo data/demo
	$(BIN)/barlow run pipeline examples/quickstart.yaml

lint: $(STAMP)
	$(BIN)/ruff check barlow tests bench cli.py
	$(BIN)/hadolint docker/Dockerfile docker/Dockerfile.cli

image:  ## the training image barlow:<version> and the CLI image barlow-cli:<version> (IMAGE=<registry>/barlow:<version> names both for a push: the CLI one <registry>/barlow-cli:<version>; CLI_IMAGE=, BASE_IMAGE=, CLI_BASE_IMAGE=, EXTRAS=mlflow,decode, BUILD_NETWORK=host)
	docker/build.sh

images-ci:  ## CI's image part: a docker daemon (Debian's docker.io, started here as root when none answers), the stand-in bases of tests/images/bases.sh (test-only), both images through docker/build.sh; `make test` then runs tests/images in them
	tests/images/ci.sh

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
