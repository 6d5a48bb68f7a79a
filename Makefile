# Two entry points: `make demo` (record an example generation into the embedded MLflow store and
# replay it) and `make test` (install everything the tests need and run the whole suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.repro-track-installed

.PHONY: demo test chromium postgresql clean

$(STAMP): pyproject.toml constraints/ci.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints/ci.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	@mkdir -p .demo
	$(BIN)/python examples/ddim_cpu.py --run-id-file .demo/run_id
	$(BIN)/repro-track replay "$$(cat .demo/run_id)"

test: $(STAMP) chromium postgresql
	$(BIN)/python -m pytest -n auto

# The MLflow UI test drives Debian's Chromium; install it where we can (CI runs as root).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "Chromium is missing: install it (apt-get install chromium) for the browser test"; fi; }

# tests/test_postgres.py starts a real PostgreSQL (deploy/local-stack.sh); Debian keeps initdb off PATH.
postgresql:
	@command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	  else echo "PostgreSQL is missing: install it (apt-get install postgresql) for the PostgreSQL-backed tests"; fi; }

clean:
	rm -rf $(VENV) .demo mlflow.db mlruns mlartifacts
