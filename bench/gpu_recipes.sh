#!/usr/bin/env bash
# On a GPU machine (one call of at most 10 minutes): bench/recipes.py at full size, then the files that come
# back in $OUT (at most 8 files of 16 MiB, 64 MiB together): the log, a tarball of every row's model card,
# progress and config, and the final teacher in 3 parts. The final students stay in /tmp/recipes/runs/final
# for a second, immediate call (the machine stays warm 30 s):
#   cd /tmp/recipes/runs/final && split -b 16700000 student.safetensors $OUT/student.part. \
#     && split -b 16700000 student_baseline.safetensors $OUT/student_baseline.part.
# Prepare here first: bash bench/gpu_prepare.sh; move weights/*.safetensors aside (see its header).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -d .whl ] && ! python3 -c "import lightly, pydantic, pytorch_grad_cam" 2>/dev/null; then
  # the packages the device image lacks (bench/gpu_prepare.sh); a machine that has them keeps its own
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1 | tee "$OUT/recipes.log"
python3 bench/recipes.py --data data/chest_xray --work /tmp/recipes --device "${DEVICE:-cuda}" ${RECIPE_ARGS:-} \
  --budget "${BUDGET:-480}" --workers "${WORKERS:-4}" ${SCALE:+--scale $SCALE} 2>&1 | tee -a "$OUT/recipes.log"
status=$?
cp bench/recipes/gpu_final.json /tmp/recipes/ 2>/dev/null
(cd /tmp/recipes && tar czf "$OUT/results.tgz" results.json gpu_final.json configs logs \
  $(ls runs/*/model_card.json runs/*/progress.jsonl runs/*/config.json runs/*/*/done.json 2>/dev/null))
[ -f /tmp/recipes/runs/final/teacher.safetensors ] && split -b 16700000 /tmp/recipes/runs/final/teacher.safetensors "$OUT/teacher.part."
ls -la "$OUT"
exit $status
