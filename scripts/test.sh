#!/usr/bin/env bash
# Set up a virtual environment from nothing, then lint, type-check and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev,app,labels,tensorboard,export]"
.venv/bin/ruff check cifarcam tests benchmarks
.venv/bin/ruff format --check cifarcam tests benchmarks
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
