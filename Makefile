# Two entry points: `make demo` (record an example generation into the embedded MLflow store and
# replay it) and `make test` (install everything the tests need and run the whole suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.repro-track-installed

.PHONY: demo test clean

$(STAMP): pyproject.toml constraints/ci.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints/ci.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	@mkdir -p .demo
	$(BIN)/python examples/ddim_cpu.py --run-id-file .demo/run_id
	$(BIN)/repro-track replay "$$(cat .demo/run_id)"

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .demo mlflow.db mlruns mlartifacts
