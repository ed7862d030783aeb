# Everyday targets. The README's two commands need nothing but Python and pip; these are shortcuts.
PY ?= python3

.PHONY: install dev test lint format demo bench clean

install:
	$(PY) install.py

dev:
	$(PY) install.py --dev

test:
	$(PY) -m pytest

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format:
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

demo:
	$(PY) -m aioli_fast demo

bench:
	$(PY) benchmarks/bench_domain_ce.py

clean:
	rm -rf runs .pytest_cache .ruff_cache .benchmarks build *.egg-info
