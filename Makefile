# Two doors for a fresh clone: `make demo` runs the main job, `make test` runs every test.
# Both set up .venv/ first (scripts/setup, idempotent).
.PHONY: setup demo test lint lock bench schema

setup:
	@scripts/setup

demo: setup
	@scripts/demo

test: setup
	@scripts/test

lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy

lock:
	.venv/bin/uv pip compile requirements.in --python-version 3.11 -o requirements.lock --no-header

bench: setup
	.venv/bin/python bench/bench_pipeline.py

schema: setup
	.venv/bin/python -c "from etl.store import schema_ddl; print(schema_ddl(), end='')" > sql/schema.sql
