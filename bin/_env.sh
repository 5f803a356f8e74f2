# Shared by bin/quickstart and bin/test: make .venv and install pyngora into it.
# Sourced, not run. Sets $ROOT and $PY.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

pick_python() {
  for c in python3.13 python3.12 python3.11 python3; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      echo "$c"; return 0
    fi
  done
  echo "pyngora needs Python 3.11 or newer" >&2
  return 1
}

apt_install() {  # apt_install PKG... : only as root, only what is missing; never fatal
  [ "$(id -u)" = 0 ] || return 0
  command -v apt-get >/dev/null 2>&1 || return 0
  if [ ! -f /tmp/.pyngora-apt-updated ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null 2>&1 && touch /tmp/.pyngora-apt-updated || true
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1 \
    || echo "bin: apt-get could not install: $* (tests needing them will be skipped)" >&2
}

ensure_venv() {  # ensure_venv EXTRA
  local extra="$1" base
  base="$(pick_python)"
  if [ ! -x .venv/bin/python ]; then
    if ! "$base" -m venv .venv 2>/dev/null; then
      rm -rf .venv
      apt_install python3-venv
      "$base" -m venv .venv
    fi
  fi
  PY="$ROOT/.venv/bin/python"
  local stamp=".venv/.pyngora-installed$extra" want
  want="$(cat pyproject.toml | sha1sum | cut -d' ' -f1)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    "$PY" -m pip install -q --disable-pip-version-check -U pip >/dev/null 2>&1 || true
    "$PY" -m pip install -q --disable-pip-version-check -e ".$extra"
    echo "$want" > "$stamp"
  fi
}
