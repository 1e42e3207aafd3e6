.PHONY: setup test test-fast
PY := .venv/bin/python

setup:
	bash scripts/setup.sh

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests
