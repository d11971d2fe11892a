#!/usr/bin/env bash
# The whole test suite on CPU (8 fake devices are set up by tests/conftest.py).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/bootstrap.sh" test
cd "$root"
exec "$root/.venv/bin/python" -m pytest "$@"
