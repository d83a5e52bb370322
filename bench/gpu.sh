#!/usr/bin/env bash
# Every CUDA path on one GPU in one go (under 8 minutes on an H100-class GPU): the device's
# bf16 matmul peak, then SFT and SFO training (bench/tune.py), JeDi set completion and joint
# training (bench/joint.py), OneActor tuning and guided sampling (bench/oneactor.py), and
# DETEX and concept-token training against SFT with the concepts' E-step and its dense-CRF
# refinement per image (bench/tokens.py),
# all on SD 1.5's UNet architecture at 512 px in bf16 with random weights (nothing is
# downloaded); then SFT and SFO on SDXL's UNet and FLUX.1-dev's 12B transformer at 1024 px
# (bench/families.py, through tune.py --arch; FLUX with gradient checkpointing, and 8-bit
# AdamW where bitsandbytes is installed), then a summary of steps/s, peak GPU memory and
# TFLOP/s against the peak.
#
#   bench/gpu.sh             on the GPU
#   bench/gpu.sh --dry-run   the same script on the CPU at tiny sizes (the test suite runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT_DIR:-bench/out/gpu}
if [[ "${1:-}" == "--dry-run" ]]; then
  ARCH=(--arch tiny --device cpu)
  PEAK=(--device cpu --side 256 --rounds 1)
  TUNE=(--steps 2 --warmup 1 --rounds 1)
  JOINT=(--sample-steps 2 --train-steps 2 --warmup 1 --rounds 1 --max-refs 1 --memory-sets 4)
  ONEACTOR=(--steps 2 --warmup 1 --rounds 1 --aux-images 2)
  TOKENS=(--steps 2 --warmup 1 --rounds 1 --e-steps 1 --repeats 1)
  FLUX=(--arch tiny-flux --device cpu --steps 1 --warmup 1 --options ckpt)  # bench/families.py once; no SDXL
else
  ARCH=(--arch sd15 --device cuda)
  PEAK=(--device cuda)
  TUNE=(--steps 20 --rounds 2)
  JOINT=(--rounds 2 --memory-sets)
  ONEACTOR=(--steps 10 --rounds 2)
  TOKENS=(--steps 10 --rounds 2)
  SDXL=(--arch sdxl --device cuda --steps 5 --warmup 2 --options base ckpt 8bit)
  FLUX=(--arch flux --device cuda --steps 3 --warmup 2 --options ckpt 8bit)
fi
set -x
"$PY" bench/peak.py measure "${PEAK[@]}" --out "$OUT"
"$PY" bench/tune.py "${ARCH[@]}" "${TUNE[@]}" --out "$OUT/tune"
"$PY" bench/joint.py "${ARCH[@]}" "${JOINT[@]}" --out "$OUT/joint"
"$PY" bench/oneactor.py "${ARCH[@]}" "${ONEACTOR[@]}" --out "$OUT/oneactor"
"$PY" bench/tokens.py "${ARCH[@]}" "${TOKENS[@]}" --out "$OUT/tokens"
if [[ -v SDXL ]]; then "$PY" bench/tune.py "${SDXL[@]}" --out "$OUT/sdxl"; fi
"$PY" bench/tune.py "${FLUX[@]}" --out "$OUT/flux"
set +x
"$PY" bench/peak.py summary "$OUT"
