#!/usr/bin/env bash
# Install twa and run the whole pipeline on the bundled digits data (no download), in about a minute on 2 CPU cores.
#   sample -> swa -> orthogonalize -> train-subspace -> eval (-> plot, when matplotlib is installed)
# The head-stage experiment of the paper in miniature: regular SGD for 12 epochs; SWA and TWA over the
# checkpoints of the first 6 epochs only; then all three are scored side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/quickstart}

python -m pip install --quiet -e .
rm -rf "$OUT"
mkdir -p "$OUT"

twa sample "$OUT/ckpts" --model small-cnn --data digits --epochs 12 --per-epoch 2 --seed 0
# Positions 0..12 of the folder: the initial weights and two samples per epoch of epochs 1-6.
twa swa "$OUT/ckpts" --end 13 -o "$OUT/swa.safetensors"
twa orthogonalize "$OUT/ckpts" --end 13 -o "$OUT/basis.safetensors"
twa train-subspace "$OUT/basis.safetensors" -o "$OUT/twa" --epochs 5 --lr 1
last=$(ls "$OUT"/ckpts/ckpt-*.safetensors | sort | tail -n 1)
twa eval "$last" "$OUT/swa.safetensors" "$OUT/twa/twa.safetensors" --split both \
  --label "SGD, 12 epochs" --label "SWA, epochs 0-6" --label "TWA, epochs 0-6 + 5"
if python -c "import matplotlib" 2>/dev/null; then
  twa eval "$last" "$OUT/swa.safetensors" "$OUT/twa/twa.safetensors" --json --quiet > "$OUT/eval.json"
  twa plot "$OUT/twa" "$OUT/eval.json" -o "$OUT/plots" --surface
else
  echo "pictures: pip install 'twa-cli[plot]' and run this script again" >&2
fi
