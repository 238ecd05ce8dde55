#!/usr/bin/env bash
# The whole GPU measurement of the edsam stage in one call, on a machine with torch and a CUDA GPU.
#
#   make gpu-wheels            # here: the packages that machine lacks, into .whl/
#   bash bench/edsam_gpu.sh    # there (carry .whl): the gpu tests, the benchmark at 512 px, the
#                              # recipes on SD-1.5, SD-Turbo (SD-2.1) and SDXL / SDXL-Turbo shapes
#
# Results (JSON and the printed table) go to $OUT when set, else bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/dgaug-site .whl/*.whl
  export PYTHONPATH="/tmp/dgaug-site:${PYTHONPATH:-}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1
results="${OUT:-bench/results}"
mkdir -p "$results"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$results/gpu.txt"
# Correctness first: the stage on CUDA in bf16 / fp16 / fp32, reproducible, worst objective.
python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_edsam_gpu.py 2>&1 | tee "$results/gpu-tests.txt"
# 512 px, SD-1.5 shapes, bf16, M=10, 20 steps, guidance 5: the default batch (8) and two larger,
# the per-image img2img loop on 2 images (it is the slow one), and dgaug compiled.
python3 bench/edsam.py --device cuda --model sd15 --images 8 --baseline-images 2 \
  --batch-sizes 8,16,32 --compile --out "$results/edsam-gpu.json" 2>&1 | tee "$results/edsam-gpu.txt"
# The README's recipes (issue 17): paper and balanced on SD-1.5 shapes, fast on SD-Turbo's
# (SD-2.1-base) shapes with TAESD's decoder; samples/s, % of the FLOP-bound rate, peak memory.
for recipe in paper balanced fast; do
  python3 bench/edsam.py --device cuda --recipe "$recipe" --images 8 --batch-sizes 8,32 \
    --no-baseline --output-size 256 --out "$results/edsam-gpu-$recipe.json" 2>&1 \
    | tee "$results/edsam-gpu-$recipe.txt"
done
# SDXL shapes (random weights): paper-xl = the paper recipe at 1024 px (~285 TFLOP a sample, so
# fewer samples), fast-xl = SDXL-Turbo's shapes at 512 px, 2 steps, no CFG, TAESD's decoder.
python3 bench/edsam.py --device cuda --recipe paper-xl --images 2 --samples 4 --batch-sizes 8 \
  --repeats 1 --no-baseline --output-size 256 --out "$results/edsam-gpu-paper-xl.json" 2>&1 \
  | tee "$results/edsam-gpu-paper-xl.txt"
python3 bench/edsam.py --device cuda --recipe fast-xl --images 8 --batch-sizes 8,32 \
  --no-baseline --output-size 256 --out "$results/edsam-gpu-fast-xl.json" 2>&1 \
  | tee "$results/edsam-gpu-fast-xl.txt"
