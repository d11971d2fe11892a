#!/usr/bin/env bash
# Create ./.venv with the pinned dependencies. Idempotent: a second run with the same
# pyproject/lock installs nothing. Usage: scripts/bootstrap.sh [runtime|test]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
profile="${1:-runtime}"
venv="$root/.venv"

pick_python() {
  for py in "${PYTHON:-}" python3.11 python3 python; do
    [ -n "$py" ] || continue
    if command -v "$py" >/dev/null 2>&1 &&
       "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$py"; return 0
    fi
  done
  echo "sftjax needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2
  return 1
}

[ -x "$venv/bin/python" ] || "$(pick_python)" -m venv "$venv"

case "$profile" in
  runtime) spec="$root" ;;
  test) spec="$root[test]" ;;
  *) echo "unknown profile '$profile' (runtime|test)" >&2; exit 2 ;;
esac

stamp="$venv/.sftjax-$profile"
want="$(cat "$root/pyproject.toml" "$root/requirements/lock.txt" | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[bootstrap] installing pinned dependencies ($profile) into $venv ..." >&2
log="$venv/.sftjax-install.log"
if ! "$venv/bin/python" -m pip install -q --disable-pip-version-check \
    -c "$root/requirements/lock.txt" -e "$spec" >"$log" 2>&1; then
  cat "$log" >&2
  echo "[bootstrap] pip install failed (log: $log)" >&2
  exit 1
fi
echo "$want" > "$stamp"
