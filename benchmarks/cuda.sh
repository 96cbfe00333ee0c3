#!/usr/bin/env bash
# The GPU checks and benchmarks in one go (CI has no GPU; run where one is lent):
#   bash benchmarks/cuda.sh OUTDIR [quick|compiled|decide]   -> OUTDIR/check.log, profile_*.txt, *.json, and
#                                                        benchmarks.md (a copy of docs/benchmarks.md with the GPU sections filled in)
# compiled: only the comparison of both models compiled (training; up to 9 minutes, most of it compiling).
# decide (9.5 minutes of limits): what the 0.9x question needs in one lease: bench_bias (its error check is the
# first GPU run of the dots backward's second version), the eager training comparison with dat_tiny also on
# the fused Triton attention (KERNEL=triton, session 21, not timed before) and the matmul attention (KERNEL=matmul:
# logits made, no fused SDPA), then both models compiled.
# quick: bench_bias, the eager model comparison, the checks, dat_tiny's profiles with SDPA and with the fused
# Triton attention only (limits 9.75 minutes in all; ~4.5 minutes on an H200 in session 17, before the fused
# attention was added to the comparison, the checks and the profiles: fits a 15-minute lease with time to start).
# bench_bias times the Triton settings first; the model comparison then takes the fastest that ran as
# dat_tiny's and times the fused Triton attention (KERNEL=triton) and the next two as more dat_tiny
# contenders (a setting that fails to build there drops out alone). Each step has its own time limit, so
# one that hangs or fails does not take the others with it. Seen on an H100: check_cuda ~3 minutes (its
# limit raised by 30 s, taken from bench_bias's, when it gained the fused attention's checks), bench_bias
# ~40 s, the eager model comparison ~2 minutes, the compiled one past 150 s (compiling both models' training steps).
set -u
out=${1:?usage: bash benchmarks/cuda.sh OUTDIR [quick|compiled|decide]}
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.." || exit 1
cp docs/benchmarks.md "$out/benchmarks.md"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi -L; python3 -c 'import torch, timm, triton; print("torch", torch.__version__, "timm", timm.__version__, "triton", triton.__version__)'
gpu=(--device cuda --batch 128 --precision bf16 --channels-last --md "$out/benchmarks.md")
if [ "${2:-}" = decide ]; then
    timeout 60 python3 benchmarks/bench_bias.py --md "$out/benchmarks.md" --json "$out/bias.json"
    timeout 120 python3 benchmarks/bench_models.py "${gpu[@]}" --mode train --no-memory --repeats 10 \
        --dat-settings KERNEL=triton KERNEL=matmul --json "$out/models.json"
    timeout 390 python3 benchmarks/bench_models.py "${gpu[@]}" --mode train --compile --no-memory --repeats 5 \
        --json "$out/models-compiled.json"
    echo "done (decide): $out"; exit 0
fi
if [ "${2:-}" = compiled ]; then
    timeout 540 python3 benchmarks/bench_models.py "${gpu[@]}" --mode train --compile --no-memory --repeats 10 \
        --json "$out/models-compiled.json"
    echo "done (compiled): $out"; exit 0
fi
rm -f "$out/bias.json"  # not an earlier run's
timeout 90 python3 benchmarks/bench_bias.py --md "$out/benchmarks.md" --json "$out/bias.json"
# the settings that ran, fastest first at stage 2 forward+backward ("default" alone without the file)
mapfile -t settings < <(python3 -c '
import json, sys
try:
    ms = next(r["ms"] for r in json.load(open(sys.argv[1]))["rows"] if r["shape"] == "stage2" and r["pass"] == "fwd+bwd")
except (OSError, ValueError, StopIteration):
    ms = {"triton default": 0}
print(*sorted((n[7:] for n in ms if n.startswith("triton ")), key=lambda n: ms["triton " + n]), sep="\n")
' "$out/bias.json")
[ ${#settings[@]} -gt 0 ] || settings=(default)
echo "dat_tiny's setting: ${settings[0]}; also timed: KERNEL=triton ${settings[*]:1:2}"
timeout 180 python3 benchmarks/bench_models.py "${gpu[@]}" --repeats 10 --json "$out/models.json" \
    --setting "${settings[0]}" --dat-settings KERNEL=triton "${settings[@]:1:2}"
timeout 210 python3 benchmarks/check_cuda.py --setting "${settings[0]}" 2>&1 | tee "$out/check.log"
timeout 60 python3 benchmarks/profile_step.py --model dat_tiny --device cuda --batch 128 --precision bf16 \
    --channels-last --rows 30 --setting "${settings[0]}" > "$out/profile_dat_tiny.txt" 2>&1
timeout 45 python3 benchmarks/profile_step.py --model dat_tiny --device cuda --batch 128 --precision bf16 \
    --channels-last --rows 30 --setting "KERNEL=triton/${settings[0]}" > "$out/profile_dat_tiny_triton.txt" 2>&1
if [ "${2:-}" = quick ]; then echo "done (quick): $out"; exit 0; fi
timeout 45 python3 benchmarks/bench_sdpa.py --md "$out/benchmarks.md" --json "$out/sdpa.json"
timeout 60 python3 benchmarks/profile_step.py --model swin_tiny --device cuda --batch 128 --precision bf16 \
    --channels-last --rows 30 > "$out/profile_swin_tiny.txt" 2>&1
timeout 120 python3 benchmarks/bench_attention.py --device cuda --batch 128 --repeats 10 --md "$out/benchmarks.md" \
    --json "$out/attention.json"
timeout 50 python3 benchmarks/bench_models.py "${gpu[@]}" --mode train --sampler dense --no-memory --repeats 10 \
    --json "$out/models-dense.json"
timeout 400 python3 benchmarks/bench_models.py "${gpu[@]}" --mode train --compile --no-memory --repeats 10 \
    --json "$out/models-compiled.json"
echo "done: $out"
