"""Where a training step's time goes: torch.profiler over a few steps of a timm model (dat_tiny by
default), the ops with the most self device time (CUDA kernels on a GPU, CPU ops on the CPU).

    python benchmarks/profile_step.py [--model dat_tiny] [--device cuda] [--batch 128] [--precision bf16] \
        [--channels-last] [--steps 3] [--rows 25] [--setting BACKWARD=loop | KERNEL=triton]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import MODELS, build, check  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dat_tiny", choices=list(MODELS))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--setting", default="default", help="of the Triton bias kernels (bench_bias.py's notation), and "
                   "KERNEL= / SAMPLER= (the deformable blocks' options), joined by /")
    a = p.parse_args()
    check(a.setting, "profile_step.py")  # a malformed setting fails here, in one line, before the model is built
    step = build(a.model, a.batch, argparse.Namespace(**vars(a), compile=False, sampler="auto", kernel="auto"),
                 train=True, setting=a.setting)  # the training step bench_models times
    for _ in range(2):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if a.device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(a.steps):
            step()
        if a.device == "cuda":
            torch.cuda.synchronize()
    key = "self_device_time_total" if a.device == "cuda" else "self_cpu_time_total"
    print(f"{a.model}, {a.device}, batch {a.batch}, {a.precision}, {a.steps} steps")
    if a.device == "cuda":  # how busy the GPU is: kernel time against the step's wall time (unprofiled)
        events = prof.key_averages()
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.self_device_time_total for e in kernels) / 1e3 / a.steps
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(a.steps):
            step()
        end.record()
        torch.cuda.synchronize()
        wall = start.elapsed_time(end) / a.steps
        print(f"per step: wall {wall:.1f} ms, GPU kernels {busy:.1f} ms ({busy / wall:.0%} busy), "
              f"{sum(e.count for e in kernels) / a.steps:.0f} kernel launches")
    print(prof.key_averages().table(sort_by=key, row_limit=a.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
