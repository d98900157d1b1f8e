#!/usr/bin/env bash
# Every README figure for one student checkpoint, one after the other, into one folder:
#   bash scripts/measure_model.sh CHECKPOINT OUT_DIR
# held-out mIoU at three render/input sizes (seeds 2001-2003), the independent path
# (tdnet-generate + tdnet-eval on seeds 4711 and 31337), bfloat16 against float32, and the
# demo at the model's input size and at 256x512. Run it on a quiet machine: the latencies
# are only comparable when nothing else runs.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -ne 2 ]]; then
    echo "usage: bash scripts/measure_model.sh CHECKPOINT OUT_DIR" >&2
    exit 2
fi
checkpoint=$1 out=$2
bin=.venv/bin
mkdir -p "$out"
git rev-parse --short HEAD > "$out/commit.txt"
sha256sum "$checkpoint" > "$out/checkpoint.sha256"

# an array, so that a checkpoint path with spaces stays one argument
heldout=("$bin/python" -m tdnet_ros.training.heldout --checkpoint "$checkpoint" --threads 1)
three_seeds=(--seeds 2001 2002 2003 --frames 60)
"${heldout[@]}" "${three_seeds[@]}" --json "$out/heldout_512x256.json" | tee "$out/heldout_512x256.txt"
"${heldout[@]}" "${three_seeds[@]}" --width 1024 --height 512 --json "$out/heldout_1024x512.json" \
    | tee "$out/heldout_1024x512.txt"
"${heldout[@]}" "${three_seeds[@]}" --input-size 256x512 --json "$out/heldout_input256x512.json" \
    | tee "$out/heldout_input256x512.txt"

for seed in 4711 31337; do
    rm -rf "$out/indep/s$seed"
    $bin/tdnet-generate --seed "$seed" --frames 60 --out "$out/indep/s$seed" --format mcap > /dev/null
    $bin/tdnet-eval "$out/indep/s$seed" --image-topic /camera/image_raw --label-topic /camera/labels \
        --device cpu --checkpoint "$checkpoint" --no-video --no-progress --out "$out/eval_s$seed" | tee "$out/indep_s$seed.txt"
done

"${heldout[@]}" --seeds 2001 --frames 40 --compare-precision bfloat16 | tee "$out/bfloat16.txt"

$bin/tdnet-demo --checkpoint "$checkpoint" --out "$out/demo" --no-progress | tee "$out/demo.txt"
$bin/tdnet-demo --checkpoint "$checkpoint" --out "$out/demo_256x512" --no-progress \
    --input-size 256x512 | tee "$out/demo_256x512.txt"
