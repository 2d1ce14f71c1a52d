# One entry point for people and CI. `make run` and `make test` set everything up themselves.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PROTO_FILES := $(wildcard proto/llooma/v1/*.proto)

.PHONY: install run test test-fast lint typecheck proto proto-check pytest reliability bench bench-quick \
	clean chromium engine

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	@$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,embedded,bench]'
	@touch $(STAMP)

run: install
	$(VENV)/bin/llooma up

proto: install
	$(PY) -m llooma.protogen generate

proto-check: install
	$(PY) -m llooma.protogen check

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install
	$(VENV)/bin/mypy

# The status-page test drives Debian's chromium headless: installed here when missing (root and
# apt-get needed); without it that one test is skipped and says why.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium could not be installed: the status-page test will be skipped"

# llama.cpp's llama-server and Gemma 3 270M, built and assembled once per machine into
# ~/.cache/llooma/engine (LLOOMA_ENGINE_DIR); about 15 minutes the first time, instant after.
engine: install
	@$(VENV)/bin/llooma engine build

pytest: install chromium engine
	LLOOMA_ENGINE_REQUIRED=1 $(PY) -m pytest -q

test: lint typecheck proto-check pytest

# The fast subset for every change: lint, types and the unit tests (no server), under 2 minutes.
test-fast: lint typecheck proto-check
	$(PY) -m pytest -q tests/unit

# Kills, restarts, lying hosts, overload and hostile input; own stacks, about 5 minutes.
reliability: install
	$(PY) -m pytest -q tests/reliability

bench: install engine
	$(VENV)/bin/llooma bench

bench-quick: install engine
	$(VENV)/bin/llooma bench --quick

clean:
	rm -rf $(VENV) .llooma .mypy_cache .pytest_cache .ruff_cache

# The stack on 3 clustered NATS nodes on loopback (streams at R3), and its fault suite:
# each node killed in turn under load (part of `make test` too; about 3 minutes).
.PHONY: run-cluster cluster
run-cluster: install
	$(VENV)/bin/llooma up --cluster 3

cluster: install
	$(PY) -m pytest -q -m cluster tests/reliability/test_cluster.py
