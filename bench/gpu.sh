#!/usr/bin/env bash
# On a lent GPU machine: the full `gpu` preset at 224 px with per-phase images/s and wall time, and
# the training data path against a seed-style ImageFolder + PIL DataLoader (16 workers) in the same run.
#   bash bench/gpu.sh DATA OUT_DIR          (CPU smoke: PRESET=tiny DEVICE=cpu bash bench/gpu.sh DATA OUT)
set -euo pipefail
DATA=${1:?dataset root}; OUT=${2:?output folder}
PRESET=${PRESET:-gpu}; DEVICE=${DEVICE:-cuda}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null || true
start=$(date +%s)
# the labels-only ablation student is skipped by default: one device call is limited to 10 minutes
BASELINE_FLAG=$([ "${BASELINE:-0}" = 1 ] && echo "" || echo "--no-baseline")
python -m kd pipeline --data "$DATA" --out "$OUT/run" --preset "$PRESET" --device "$DEVICE" --cache-dir "$OUT/cache" \
  $BASELINE_FLAG 2>&1 | tail -n 20
echo "wall time: $(( $(date +%s) - start )) s (target <= 600 s for the gpu preset)"
python - "$OUT/run" <<'PY'
import json, sys
from collections import defaultdict
events = [json.loads(l) for l in open(f"{sys.argv[1]}/progress.jsonl")]
rates = defaultdict(list)
for e in events:
    if e["kind"] == "step":
        rates[e["phase"]].append(e["images_per_s"])
for phase, r in rates.items():
    print(f"{phase:9s} images/s {r[-1]:9.1f}")
card = json.load(open(f"{sys.argv[1]}/model_card.json"))
wall = card["wall_time_s"]
print("wall time per phase (s):", {k: round(v) for k, v in wall.items()})
three = sum(wall.get(k, 0) for k in ("pretrain", "finetune", "distill"))
print(f"TARGET ssl_finetune_distill_wall_s {three:.0f}s <=600s {'PASS' if three <= 600 else 'FAIL'}")
for role, m in card["models"].items():
    v = m["validation"]
    print(f"{role:17s} val AUC {v['auc']:.4f} CI {v['ci']['auc']} acc {v['accuracy']:.3f} thr {m['threshold']:.3f}")
PY
SIZE=$([ "$PRESET" = tiny ] && echo 32 || echo 224)
BATCH=$([ "$PRESET" = tiny ] && echo 16 || echo 128)
python bench/train_throughput.py --data "$DATA" --arch resnet50 --size "$SIZE" --batch "$BATCH" --steps 30 \
  --workers 16 --device "$DEVICE" --cache-dir "$OUT/cache"
