# Sourced by scripts/test and scripts/demo: sets PY to the Python of the project's own virtualenv
# (.venv, or $GANGWAY_VENV), built on first use, so what runs is what a new user installs from
# pyproject.toml and nothing the machine already had hides a missing pin. PYTHON=... uses that
# interpreter instead (an environment you manage yourself).
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
else
  VENV=${GANGWAY_VENV:-.venv}
  if [ ! -x "$VENV/bin/python" ]; then
    if ! python3 -m venv "$VENV" 2>/dev/null; then
      rm -rf "$VENV"
      if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then   # Debian's python3 keeps venv apart
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
      fi
      python3 -m venv "$VENV"
    fi
  fi
  PY="$VENV/bin/python"
fi
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
