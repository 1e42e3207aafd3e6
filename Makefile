.PHONY: setup test test-fast demo train-default
PY := .venv/bin/python
MODEL ?= default

setup:
	bash scripts/setup.sh

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

# the main job: segment the bundled example video and write text + masks + overlay to out/demo
demo: setup
	$(PY) -m instructseg segment instructseg/examples/shapes.mp4 "segment the large green shape" --model $(MODEL) --out out/demo

# train (or resume) the shipped default model; checkpoints resume when re-run
train-default: setup
	$(PY) -m instructseg train scripts/recipes/default.yaml
