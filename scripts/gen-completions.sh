#!/usr/bin/env bash
# Regenerates completions/ from the app (a test checks they are in sync).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
$PY -m pelt_cli.cli completion bash > completions/pelt.bash
$PY -m pelt_cli.cli completion zsh > completions/_pelt
$PY -m pelt_cli.cli completion fish > completions/pelt.fish
