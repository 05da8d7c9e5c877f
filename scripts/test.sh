#!/usr/bin/env bash
# The whole test suite: lint, format, types, tests. Creates .venv on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
.venv/bin/ruff check paramserver tests benchmarks
.venv/bin/ruff format --check paramserver tests benchmarks
.venv/bin/mypy --strict paramserver
.venv/bin/python -m pytest -p no:cacheprovider tests "$@"
