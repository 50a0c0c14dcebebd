#!/usr/bin/env bash
# Here, on the CPU machine, before a lent GPU session: put what bench/gpu.sh needs inside the checkout,
# git-ignored, so that the device tool's `carry` takes it along (../shared does not travel):
#   data/chest_xray/{train,val,test}   the 224 px train split (42 MB), the official 16-image val and the test half
#   .whl/                         the packages kd's training path needs that the device image lacks (CARRIED below;
#                                 it has torch, torchvision, pytorch_lightning, safetensors, scikit-learn, opencv, tqdm)
#   bash bench/gpu_prepare.sh [SHARED_CHEST_XRAY]
# For issue 18's comparison (bench/gpu_ssl.sh) the outside corpus travels too, and both are re-encoded small
# enough for the 64 MiB (bench/pack_images.py: grey JPEG at the longer side training reads):
#   CORPUS=../shared/data/unlabeled_cxr bash bench/gpu_prepare.sh   (train/ at TRAIN_SIDE=160 px, JPEG quality 85;
#   data/unlabeled_cxr at CORPUS_SIDE=96 px, quality 75, with its manifest.csv; val/ and test/ as they are)
# The shipped weights (69 MB, tracked) alone exceed the 64 MiB that one device call may carry, and the GPU run
# does not need them: move them aside for the call and put them back after:
#   mkdir -p /tmp/kd-weights-aside && mv weights/*.safetensors /tmp/kd-weights-aside/
#   ... one device call, carry=["data", ".whl"], command:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 && bash bench/gpu.sh data/chest_xray /tmp/gpu 2>&1 | tee $OUT/gpu.log;
#   cd /tmp/gpu/run && cp model_card.json $OUT/ && split -b 15M teacher.safetensors $OUT/teacher.part. \
#     && split -b 15M student.safetensors $OUT/student.part.
#   (at most 8 files of 16 MiB come back: log, card, 4 + 2 weight parts; `cat teacher.part.* > teacher.safetensors`)
#   mv /tmp/kd-weights-aside/*.safetensors weights/ && git status --short weights   (nothing listed: restored)
set -euo pipefail
SRC=${1:-../shared/data/chest_xray}
cd "$(dirname "$0")/.."
[ -d "$SRC/train" ] || { echo "no $SRC/train: pass the dataset root (with train/ and val/)" >&2; exit 1; }
rm -rf data/chest_xray data/unlabeled_cxr
mkdir -p data/chest_xray
for split in train val test; do
  [ -d "$SRC/$split" ] || continue
  if [ -n "${CORPUS:-}" ] && [ "$split" = train ]; then
    python3 bench/pack_images.py "$SRC/train" data/chest_xray/train --side "${TRAIN_SIDE:-160}" --quality "${TRAIN_QUALITY:-85}"
  else
    cp -r "$SRC/$split" data/chest_xray/
  fi
done
if [ -n "${CORPUS:-}" ]; then
  python3 bench/pack_images.py "$CORPUS" data/unlabeled_cxr --side "${CORPUS_SIDE:-96}" --quality "${CORPUS_QUALITY:-75}"
fi
# what kd's training, export and refusal-check path imports that the device image lacks (its package list in the
# device tool's KINDS.md): lightly (SSL), pydantic and its own needs (the model card's schema), grad-cam and ttach
# (kd.cam, imported by the refusal check's fitting); at the versions installed here, for the device's Python 3.12
CARRIED="lightly pydantic pydantic_core annotated-types typing-inspection typing_extensions grad-cam ttach"
rm -rf .whl
for name in $CARRIED; do
  version=$(python3 -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "$name==$version" 2>/dev/null \
    || python3 -m pip wheel -q --no-deps -w .whl "$name==$version"  # published as source only (grad-cam): pure Python
done
ls .whl | grep -q -v -- '-py3-none-any.whl$\|-cp312-' && { echo "a wheel in .whl/ is for neither any Python nor 3.12" >&2; exit 1; }
{ git check-ignore -q data && git check-ignore -q .whl; } || { echo "data/ or .whl/ is not git-ignored: it would travel as tracked work" >&2; exit 1; }
du -sh data .whl
tracked=$(git ls-files -z -- ':!weights/*.safetensors' | du -cb --files0-from=- | tail -1 | cut -f1)
carried=$(du -cb data .whl | tail -1 | cut -f1)
echo "would travel with the weights moved aside: $(( (tracked + carried) / 1048576 )) MiB of 64"
[ $(( tracked + carried )) -le $(( 64 * 1048576 )) ] || { echo "over 64 MiB: lower TRAIN_SIDE or CORPUS_SIDE" >&2; exit 1; }
