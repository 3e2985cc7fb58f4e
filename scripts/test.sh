#!/usr/bin/env bash
# The test command: installs the test tools (and Debian's Chromium for the browser tests), lints, runs the suite.
# Run it inside the environment where phivision is installed (README: "Run the tests").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

if ! command -v chromium >/dev/null 2>&1; then
  echo "== installing Debian's chromium for the browser tests"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi

echo "== installing phivision with its test extras"
"$PY" -m pip install -q -e '.[dev]'

echo "== ruff"
"$PY" -m ruff check src tests benchmarks
"$PY" -m ruff format --check src tests benchmarks

echo "== import-linter (the layers in pyproject.toml)"
"$PY" -c "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"

echo "== pytest"
"$PY" -m pytest -n 2 --timeout 900 "$@"
