#!/usr/bin/env bash
# GPU check, short and self-contained (a few minutes): LoRA and UniPELT training on MiniLM (`minilm`, `--data vader`)
# in bf16 on one GPU, and DDP over 2 GPUs when there are two; then merge and predict with each merged model.
# Prints the step time and peak memory of every training. Exits non-zero on the first failure or without a GPU.
#
#   bash bench/gpu_check.sh            # from the repository root; PY=python to use another interpreter
#   STEPS=200 bash bench/gpu_check.sh  # optimizer steps per training (default 150)
#   DEVICE=cpu STEPS=3 bash bench/gpu_check.sh  # the script's own smoke test, without a GPU
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
STEPS=${STEPS:-150}
DEVICE=${DEVICE:-cuda}
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
PELT=("$PY" -m pelt_cli.cli)

NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "$NGPU" -lt 1 ] && [ "$DEVICE" = cuda ]; then
  echo "gpu_check: no CUDA device visible to torch ($("$PY" -c 'import torch; print(torch.__version__)'))" >&2
  exit 1
fi
[ "$NGPU" -lt 1 ] || "$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} visible, torch {torch.__version__}, bf16 {torch.cuda.is_bf16_supported()}')"

TMP=$(mktemp -d /tmp/pelt-gpu-check.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
printf '%s\n' "a wonderful, moving film" "dull and far too long" "great fun" "awful" "superb acting" "boring plot" >"$TMP/rows.txt"

report() { # RUN LABEL: ms/step and peak memory from the run's files
  "$PY" - "$1" "$2" <<'EOF'
import json, sys
from pathlib import Path
run, label = Path(sys.argv[1]), sys.argv[2]
meta = json.loads((run / "run.json").read_text())["training"]
rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
evals = [r for r in rows if "eval_loss" in r and "kind" not in r]
steps, seconds = meta["result"]["steps"], evals[-1]["seconds"]
peak = meta.get("peak_memory", {})
acc = evals[-1].get("accuracy", float("nan"))
print(f"{label:28s} steps {steps:4d}  {1000 * seconds / steps:7.1f} ms/step (one eval included)  "
      f"eval acc {acc:.3f}  peak RSS {peak.get('rss_mb', 0):,.0f} MiB  CUDA {peak.get('cuda_mb', 0):,.0f} MiB")
EOF
}

train() { # RECIPE LABEL [launcher...]
  local recipe=$1 label=$2
  shift 2
  local run="$TMP/$label"
  "${PELT[@]}" apply "$recipe" minilm -o "$run" >/dev/null
  "$@" train "$run" --data vader --epochs 1 --max-steps "$STEPS" --precision bf16 --device "$DEVICE" \
    --batch-size 32 --lr 2e-3 -q >/dev/null
  report "$run" "$label"
}

merge_predict() { # LABEL [merge options]
  local label=$1
  shift
  "${PELT[@]}" merge "$TMP/$label" -o "$TMP/$label-merged" "$@" >/dev/null
  local n
  n=$("${PELT[@]}" predict "$TMP/$label-merged" --data "$TMP/rows.txt" | wc -l)
  [ "$n" -eq 6 ] || { echo "gpu_check: predict on $label-merged gave $n rows, expected 6" >&2; exit 1; }
  echo "$label: merged and predicted $n rows"
}

train lora lora-bf16-1gpu "${PELT[@]}"
train unipelt unipelt-bf16-1gpu "${PELT[@]}"
if [ "$NGPU" -ge 2 ]; then
  DDP=("$PY" -m torch.distributed.run --nproc-per-node 2 --master-port 29571 -m pelt_cli.cli)
  train lora lora-bf16-ddp2 "${DDP[@]}"
  train unipelt unipelt-bf16-ddp2 "${DDP[@]}"
else
  echo "one GPU: DDP over 2 GPUs skipped"
fi
merge_predict lora-bf16-1gpu
merge_predict unipelt-bf16-1gpu --freeze-gates mean --keep-unmerged
echo "gpu_check: OK"
