#!/usr/bin/env bash
# Issue 18's comparison at the gpu preset's budget, on a lent GPU machine in one call of at most 10 minutes.
#   - control: the gpu preset as shipped (no pretraining), training seed 0, started first, beside the rest;
#   - MoCo v2 pretraining of the ResNet50 on Kermany's train images plus the outside corpus, once;
#   - from that pretraining, for each training seed: the gpu preset's fine-tuning, distillation and
#     labels-only student, the seeds side by side on the one GPU;
#   - bench/kd_transfer.py over the seeds: distilled - labels-only pooled, teacher - labels-only per seed.
# Every run exports its model card with validation and the test half beside each other: each card is a look,
# to be recorded in bench/recipes.md (python bench/recipes_table.py --record RUN ...) once the files are back.
# Prepare here: CORPUS=../shared/data/unlabeled_cxr bash bench/gpu_prepare.sh (train/ at 160 px and the corpus
# at 96 px, both inside the checkout, git-ignored), move weights/*.safetensors aside as its header says, then one
# device call with carry=["data", ".whl"] and the command `bash bench/gpu_ssl.sh 2>&1 | tail -n 80`.
# Back in $OUT: gpu_ssl.log (all of this script's output) and ssl_runs.tgz (each run's model card, config,
# progress, per-phase done.json and log). Settings (environment):
#   PRETRAIN_EPOCHS (30) PRETRAIN_SIZE (96) SEEDS ("0 1 2") CONTROL (1) PRETRAIN_DEADLINE (300 s: the
#   pretraining is stopped then, its last epoch kept) DEADLINE (540 s from the start: runs still going then are
#   stopped, what finished is collected) DATA CORPUS WORK OUT PRESET (gpu) DEVICE (cuda)
# Exit status 1 when the pretraining or a run failed on its own (what a deadline stopped is not a failure).
# CPU smoke, what tests/test_bench.py runs: PRESET=tiny DEVICE=cpu PRETRAIN_EPOCHS=1 SEEDS="0 1" DATA=.. CORPUS=..
set -uo pipefail
cd "$(dirname "$0")/.."
DATA=$(realpath "${DATA:-data/chest_xray}"); CORPUS=$(realpath "${CORPUS:-data/unlabeled_cxr}")
WORK=${WORK:-/tmp/ssl}; OUT=${OUT:-/tmp/out}; PRESET=${PRESET:-gpu}; DEVICE=${DEVICE:-cuda}
SEEDS=${SEEDS:-0 1 2}; PRETRAIN_EPOCHS=${PRETRAIN_EPOCHS:-30}; PRETRAIN_SIZE=${PRETRAIN_SIZE:-96}
CONTROL=${CONTROL:-1}; DEADLINE=${DEADLINE:-540}; PRETRAIN_DEADLINE=${PRETRAIN_DEADLINE:-300}
mkdir -p "$WORK" "$OUT"
rm -f "$WORK/.deadline"
exec > >(tee -a "$OUT/gpu_ssl.log") 2>&1
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
if [ -d .whl ] && ! python3 -c "import lightly, pydantic, pytorch_grad_cam" 2>/dev/null; then
  # the packages the device image lacks (bench/gpu_prepare.sh); a machine that has them keeps its own
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi: device $DEVICE"
first=${SEEDS%% *}

# one config per run: the preset, MoCo on the corpus for the pretrained runs, the seed; the same validation split
python3 - "$WORK" "$PRESET" "$DEVICE" "$DATA" "$CORPUS" "$PRETRAIN_EPOCHS" "$PRETRAIN_SIZE" $SEEDS <<'PY' || exit 1
import sys
from kd.config import preset
work, name, device, data, corpus, epochs, size, *seeds = sys.argv[1:]
def write(run: str, seed: int, pretrained: bool) -> None:
    cfg = preset(name)
    cfg.data, cfg.out, cfg.device, cfg.seed, cfg.split_seed = data, f"{work}/{run}", device, seed, 0
    cfg.cache_dir = f"{work}/cache"
    cfg.pretrain.epochs = 0  # the control: no pretraining (the gpu preset's own setting)
    if pretrained:
        cfg.ssl_method, cfg.unlabeled = "moco", [corpus]
        cfg.pretrain.epochs, cfg.pretrain.image_size = int(epochs), int(size)
    cfg.validate()
    cfg.save(f"{work}/{run}.config.json")
write("control", 0, pretrained=False)
for seed in seeds:
    write(f"moco-seed{seed}", int(seed), pretrained=True)
PY

run() {  # run NAME [--resume], in the background: the whole pipeline of one run, its log beside it; the pid is
  # python's own (exec), so the deadline's SIGINT stops the run as Ctrl-C would: its last epoch's state kept
  exec python3 -m kd pipeline --config "$WORK/$1.config.json" --data "$DATA" --out "$WORK/$1" ${2:-} \
    > "$WORK/$1.log" 2>&1
}
pids=(); names=(); failed=()
if [ "$CONTROL" = 1 ]; then
  run control & pids+=($!); names+=(control)
fi
echo "[$(elapsed) s] MoCo pretraining: $PRETRAIN_EPOCHS epochs at $PRETRAIN_SIZE px on $DATA/train + $CORPUS"
timeout -s INT "$PRETRAIN_DEADLINE" python3 -m kd pretrain --config "$WORK/moco-seed$first.config.json" \
  --data "$DATA" --out "$WORK/moco-seed$first" > "$WORK/pretrain.log" 2>&1
rc=$?
if [ "$rc" = 124 ]; then
  echo "pretraining passed PRETRAIN_DEADLINE ($PRETRAIN_DEADLINE s): a second call resumes it with kd pretrain" \
       "--resume on the same folder"
elif [ "$rc" != 0 ]; then
  tail -n 20 "$WORK/pretrain.log"; echo "pretraining failed (exit status $rc)"; failed+=(pretraining)
fi
tail -n 3 "$WORK/pretrain.log"
if [ -f "$WORK/moco-seed$first/pretrain/done.json" ]; then
  echo "[$(elapsed) s] pretraining done; fine-tuning, distillation, labels-only student for seeds: $SEEDS"
  for seed in $SEEDS; do
    if [ "$seed" != "$first" ]; then  # the same pretraining: only the later phases' seed differs
      mkdir -p "$WORK/moco-seed$seed" && cp -r "$WORK/moco-seed$first/pretrain" "$WORK/moco-seed$seed/"
    fi
    run "moco-seed$seed" --resume & pids+=($!); names+=("moco-seed$seed")
  done
fi
left=$(( DEADLINE - $(elapsed) ))
( exec > /dev/null 2>&1; sleep $(( left > 0 ? left : 1 )); touch "$WORK/.deadline"
  for p in "${pids[@]}"; do kill -INT "$p"; done ) &
watchdog=$!
for i in "${!pids[@]}"; do  # a run the deadline stopped (kd exits 130 on SIGINT) keeps its last epoch; one that
  wait "${pids[$i]}"; rc=$?  # died on its own failed, even if the deadline came before this wait did
  if [ "$rc" != 0 ] && ! { [ "$rc" = 130 ] && [ -e "$WORK/.deadline" ]; }; then
    tail -n 20 "$WORK/${names[$i]}.log"; echo "${names[$i]} failed (exit status $rc)"; failed+=("${names[$i]}")
  fi
done
kill "$watchdog" 2>/dev/null  # its sleep, if still there, holds no output of this script
echo "[$(elapsed) s] runs ended"

python3 - "$WORK" <<'PY'
import json, sys
from pathlib import Path
for card_path in sorted(Path(sys.argv[1]).glob("*/model_card.json")):
    card = json.loads(card_path.read_text())
    for role, m in card["models"].items():
        row = [f"{card_path.parent.name:12s} {role:17s}"]
        for split in ("validation", "test"):
            s = m.get(split) or {}
            if s.get("auc") is not None:
                row.append(f"{split} AUC {s['auc']:.4f} acc {s['accuracy']:.3f} sens {s['sensitivity']:.3f} "
                           f"spec {s['specificity']:.3f}")
        print(" | ".join(row))
PY
done_seeds=()
for seed in $SEEDS; do [ -f "$WORK/moco-seed$seed/model_card.json" ] && done_seeds+=("$WORK/moco-seed$seed"); done
if [ ${#done_seeds[@]} -gt 1 ]; then
  python3 bench/kd_transfer.py --data "$DATA" --weights "${done_seeds[0]}" --seeds "${done_seeds[@]:1}"
elif [ ${#done_seeds[@]} -eq 1 ]; then
  python3 bench/kd_transfer.py --data "$DATA" --weights "${done_seeds[0]}"
fi
(cd "$WORK" && tar czf "$OUT/ssl_runs.tgz" *.config.json *.log \
  $(ls */model_card.json */progress.jsonl */config.json */*/done.json 2>/dev/null))
echo "[$(elapsed) s] done; $OUT: $(ls "$OUT" | tr '\n' ' ')"
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED: ${failed[*]} (their logs are in ssl_runs.tgz)"; exit 1
fi
