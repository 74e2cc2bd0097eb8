# paramserver: `make demo` trains on a local cluster, `make test` runs the whole suite.
# Both create .venv (Python 3.11+) and install the project on first use.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: demo test test-node browser docker-test lint proto bench clean

$(STAMP): pyproject.toml setup.py paramserver/_exchange.c
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/psctl launch --local --workers 4 --model mlp:64 --dataset digits --staleness 2

test: $(STAMP) test-node browser
	$(BIN)/pytest

# tests/browser drive Debian's chromium (Playwright cannot download its own browser here).
browser:
	@test -n "$$CHROMIUM" || command -v chromium >/dev/null || { test "$$(id -u)" = 0 && apt-get update -q >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; } || \
	  { echo "tests/browser need chromium: apt-get install chromium (as root), or set CHROMIUM=PATH"; exit 1; }

test-node:
	cd worker/node && npm ci --no-audit --no-fund --silent && npm test

docker-test: $(STAMP)
	bash deploy/ci-docker.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy -p ps_server -p worker -p client -p paramserver -p paramserver.v1
	$(BIN)/buf lint

proto: $(STAMP)
	$(BIN)/python protos/generate.py

bench: $(STAMP)
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/small_model.py --repeats 3
	$(BIN)/python bench/large_model.py
	$(BIN)/python bench/straggler.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
