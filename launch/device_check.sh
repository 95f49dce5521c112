#!/usr/bin/env bash
# The device check: what mimdistill does on one H100/H200 (or any GPU/TPU),
# in under 10 minutes. Prints, as JSON lines and tables:
#   1. the ViT-L (block 18) -> ViT-B distillation step (configs/tinymim_distill.py:b_from_l)
#      at 224 px, bfloat16, batch 128, fused attention off and on: img/s, MFU against the
#      vendor peak and against the measured matmul rate (--calibrate), peak memory;
#   2. the input pipeline on this host's cores (distill augmentation, 224 px, workers = cores);
#   3. TinyMIM distillation against MAE pre-training of the same student at equal budget,
#      each followed by the same fine-tuning, on the embedded dataset (or DATA=folder:<path>),
#      with the final top-1 of both.
#
#   bash launch/device_check.sh [OUT_DIR]        # OUT_DIR default /tmp/device_check
#
# All of it stays within BUDGET seconds (default 540): the device tool runs one
# command for at most 600 s, and the sections' own limits add up to more, so a
# section gets what is left of the budget when its own limit would overrun it,
# and one with under 30 s left is skipped with a line saying so.
#
# Packages the device lacks (tensorflow-datasets, grain, array-record, ml-collections,
# ...) are installed first from ./.whl when that folder exists (see the device tool's
# README); nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/device_check}
BUDGET=${BUDGET:-540}
if ! [[ $BUDGET =~ ^[0-9]+$ ]]; then
  echo "BUDGET=$BUDGET is not a whole number of seconds: give e.g. BUDGET=540" >&2
  exit 2
fi
DATA=${DATA:-embedded}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
python3 -c "import jax; print('devices:', jax.devices())"

# run NAME SECONDS CMD...: a command that fails or runs out of time is
# reported in its output, and the later sections still run.
run() {
  local name=$1 secs=$2 left
  shift 2
  left=$((BUDGET - SECONDS))
  if [ "$left" -lt 30 ]; then
    printf '%s: skipped, %ss left of BUDGET=%ss\n' "$name" "$left" "$BUDGET"
    return 0
  fi
  if [ "$secs" -gt "$left" ]; then secs=$left; fi
  # (on a line of its own: a cut-off progress bar leaves no newline)
  timeout "$secs" "$@" 2>&1 || printf '\n%s: exit %s (124: timed out)\n' "$name" "$?"
}

echo "== 1. b_from_l step, 224 px, bf16, batch 128, fused attention off / on"
run "step benchmark" 300 python3 launch/benchmark.py --config configs/tinymim_distill.py:b_from_l \
  --config.dtype=bfloat16 --config.batch_size=128 --steps 10 --warmup 3 --calibrate \
  --sweep student.fused_attention+teacher.fused_attention=false,true \
  --json_out "$OUT/step.jsonl" | tee "$OUT/step.txt"

echo "== 2. input pipeline, distill augmentation, 224 px, $(nproc) workers"
run "input benchmark" 120 python3 launch/benchmark.py --config configs/tinymim_distill.py:quickstart \
  --config.data.name="$DATA" --config.data.data_dir="$OUT/tfds" --config.data.image_size=224 \
  --config.student.image_size=224 --config.teacher.image_size=224 --config.batch_size=256 \
  --input_only --steps 20 --sweep data.num_workers=0,$(nproc) \
  --json_out "$OUT/input.jsonl" | tee "$OUT/input.txt"

echo "== 3. TinyMIM distillation vs MAE pre-training of the same student, equal budget"
# Fine-tuned top-1 is the comparison, so the segmentation stage is left out
# (it would spend device time compiling UperNet twice). A stage cut short by
# its timeout leaves its checkpoints.
COMMON=(--config.pretrain.data.name="$DATA" --config.distill.data.name="$DATA"
        --config.finetune.data.name="$DATA" --config.pretrain.data.data_dir="$OUT/tfds"
        --config.distill.data.data_dir="$OUT/tfds" --config.finetune.data.data_dir="$OUT/tfds"
        --config.distill.dtype=bfloat16 --config.pretrain.dtype=bfloat16
        --config.finetune.dtype=bfloat16)
run "tinymim pipeline" 150 python3 launch/pipeline.py --config configs/pipeline.py:quickstart \
  --workdir "$OUT/tinymim" --config.stages=pretrain,distill,finetune "${COMMON[@]}" \
  | tail -8 | tee "$OUT/tinymim.txt"
run "mae pipeline" 120 python3 launch/pipeline.py --config configs/pipeline.py:mae_baseline:quickstart \
  --workdir "$OUT/mae" --config.stages=pretrain,finetune "${COMMON[@]}" \
  | tail -6 | tee "$OUT/mae.txt"
echo "== done: $OUT"
