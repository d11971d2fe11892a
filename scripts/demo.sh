#!/usr/bin/env bash
# The tiny end-to-end demo on CPU (bootstraps ./.venv): synthetic instructions -> masked,
# packed fine-tuning -> validation loss -> early stopping -> best checkpoint -> answers.
# Extra arguments go to `python -m sftjax.demo` (e.g. --workdir=runs/my-demo).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/bootstrap.sh" runtime
cd "$root"
exec "$root/.venv/bin/python" -m sftjax.demo "$@"
