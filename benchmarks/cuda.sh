#!/usr/bin/env bash
# The GPU checks and benchmarks in one go (CI has no GPU; run where one is lent):
#   bash benchmarks/cuda.sh OUTDIR [quick]   -> OUTDIR/check.log, profile_*.txt, *.json, and benchmarks.md (a
#                                               copy of docs/benchmarks.md with the GPU sections filled in)
# quick: the checks, bench_bias, the eager model comparison and the profiles only (limits 9 minutes in all:
# fits a 15-minute lease with time to start the machine).
# Each step has its own time limit, so one that hangs or fails does not take the others with it. All limits
# together are 18 minutes; seen on an H100: check_cuda ~3 minutes, bench_bias ~40 s, the eager model
# comparison ~2 minutes, the compiled one past 150 s (compiling both models' training steps).
set -u
out=${1:?usage: bash benchmarks/cuda.sh OUTDIR [quick]}
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.." || exit 1
cp docs/benchmarks.md "$out/benchmarks.md"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi -L; python3 -c 'import torch, timm; print("torch", torch.__version__, "timm", timm.__version__)'
gpu=(--device cuda --batch 128 --precision bf16 --channels-last --md "$out/benchmarks.md")
timeout 180 python3 benchmarks/check_cuda.py 2>&1 | tee "$out/check.log"
timeout 90 python3 benchmarks/bench_bias.py --md "$out/benchmarks.md" --json "$out/bias.json"
timeout 120 python3 benchmarks/bench_models.py "${gpu[@]}" --repeats 10 --json "$out/models.json"
for m in dat_tiny swin_tiny; do  # where a training step's time goes
    timeout 60 python3 benchmarks/profile_step.py --model $m --device cuda --batch 128 --precision bf16 \
        --channels-last --rows 30 > "$out/profile_$m.txt" 2>&1
done
if [ "${2:-}" = quick ]; then echo "done (quick): $out"; exit 0; fi
timeout 120 python3 benchmarks/bench_attention.py --device cuda --batch 128 --repeats 10 --md "$out/benchmarks.md" \
    --json "$out/attention.json"
timeout 50 python3 benchmarks/bench_models.py "${gpu[@]}" --mode train --sampler dense --no-memory --repeats 10 \
    --json "$out/models-dense.json"
timeout 400 python3 benchmarks/bench_models.py "${gpu[@]}" --mode train --compile --no-memory --repeats 10 \
    --json "$out/models-compiled.json"
echo "done: $out"
