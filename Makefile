# The two commands a new user runs: `make demo` and `make test`. Both create .venv on first use.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: install demo demo-light demo-stop test test-fast bench toy-models clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	# hpsv2 is only the reference for the scorer's parity test; it pins pytest==7.2.0 and protobuf<4, hence --no-deps.
	$(BIN)/pip install -q --no-deps hpsv2==1.2.0
	# img2dataset pulls the Python 3.6 `dataclasses` backport, which breaks Prefect's server: remove it.
	$(BIN)/pip uninstall -y -q dataclasses || true
	touch $(STAMP)

install: $(STAMP)

# Two pytest workers (pytest-xdist), one test file per worker at a time (module fixtures such as the e2e
# cluster stay on one worker); TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -q -x --durations=15 $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not browser"

demo: $(STAMP)
	bash scripts/demo.sh

demo-light: $(STAMP)
	bash scripts/demo.sh demo-light

demo-stop:
	bash scripts/demo_stop.sh

toy-models: $(STAMP)
	$(BIN)/python scripts/train_toy_models.py

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf runs .demo
