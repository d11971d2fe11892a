#!/usr/bin/env bash
# The whole test suite on CPU (8 fake devices are set up by tests/conftest.py).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/bootstrap.sh" test
cd "$root"
# Style is part of the suite (STYLE.md): lint and formatting first, they take seconds.
"$root/.venv/bin/ruff" check sftjax tests configs benchmarks
"$root/.venv/bin/ruff" format --check sftjax tests configs benchmarks
exec "$root/.venv/bin/python" -m pytest "$@"
