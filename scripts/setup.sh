#!/usr/bin/env bash
# Creates .venv with the exact pins of requirements.txt and installs pelt into it (editable).
# Idempotent: re-runs pip only when requirements.txt or pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.pelt-setup-stamp
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
# Bytecode for pelt_cli, as a regular (non-editable) pip install writes it: `pelt --help` and tab completion then
# skip compiling the CLI at each start (PYTHONDONTWRITEBYTECODE=1 stops Python from caching it itself). Cheap:
# only changed files are compiled; a stale file is still recompiled in memory, so it is never out of date.
compile() { .venv/bin/python -m compileall -q pelt_cli >/dev/null 2>&1 || true; }
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x .venv/bin/pelt ]; then
  compile
  exit 0
fi
echo "pelt: setting up .venv (first run: about 2 minutes)" >&2
[ -d .venv ] || "$PY" -m venv .venv
# torch==2.13.0 is named in requirements.txt: that CPU wheel is on this machine's disk.
.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt >&2
.venv/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . --config-settings editable_mode=compat >&2
echo "$want" > "$stamp"
compile
