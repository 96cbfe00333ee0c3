"""The deformable block (DAT_SPEC section 2) at DAT-T's stage-2 and stage-3 shapes: this project's
fast path against the plain reference transcription (the released formulation: 1x1 convs,
grid_sample for keys and bias, einsum attention), forward and forward + backward, and peak memory.

    python benchmarks/bench_attention.py [--device cpu|cuda] [--batch 8] [--repeats 7] [--md docs/benchmarks.md] \
        [--sampler auto|grid_sample|dense|triton|native] [--kernel auto|matmul|sdpa]   # options of the dat-lab path
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (add_output_options, add_path_options, alternate, cuda_peak_mb, in_subprocess, machine,  # noqa: E402
                    markdown, path_options, peak_rss_delta_mb, write)

from dat_lab.models import StageConfig  # noqa: E402
from dat_lab.models.attention import DeformableAttention, set_deformable_options  # noqa: E402

SHAPES = {  # DAT-T: stage 2 (C 384, 14x14, 12 heads, G 3, k 5), stage 3 (C 768, 7x7, 24 heads, G 6, k 3)
    "stage2": dict(dim=384, heads=12, groups=3, size=14, kernel=5),
    "stage3": dict(dim=768, heads=24, groups=6, size=7, kernel=3),
}


def make_block(shape: str, device: str) -> DeformableAttention:
    """A deformable block at one of SHAPES, seeded."""
    s = SHAPES[shape]
    torch.manual_seed(0)
    stage = StageConfig(dim=s["dim"], depth=2, heads=s["heads"], blocks="LD", groups=s["groups"],
                        offset_kernel=s["kernel"])
    return DeformableAttention(stage=stage, q_size=(s["size"], s["size"]), attn_drop=0.0, proj_drop=0.0).to(device)


def build(shape: str, reference: bool, batch: int, device: str, backward: bool, sampler: str = "auto",
          kernel: str = "auto"):
    s = SHAPES[shape]
    block = set_deformable_options(make_block(shape, device), reference=reference, sampler=sampler, kernel=kernel)
    x = torch.randn(batch, s["size"], s["size"], s["dim"], device=device, requires_grad=backward)  # channels-last

    def run() -> None:
        if backward:
            block(x)[0].sum().backward()
        else:
            with torch.no_grad():
                block(x)

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7)
    add_output_options(p, "attention")
    add_path_options(p, "the dat-lab path")
    p.add_argument("--measure-memory", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.measure_memory:  # child: shape, impl, pass
        shape, impl, kind = a.args
        fn = lambda: build(shape, impl == "reference", a.batch, a.device, kind == "fwd+bwd",  # noqa: E731
                           a.sampler, a.kernel)
        print(cuda_peak_mb(fn()) if a.device == "cuda" else peak_rss_delta_mb(fn))
        return
    options = path_options(a)
    results = {"machine": machine(a.device), "device": a.device, "batch": a.batch, "repeats": a.repeats,
               "sampler": a.sampler, "kernel": a.kernel, "rows": []}
    for shape in SHAPES:
        for kind in ("fwd", "fwd+bwd"):
            runs = {impl: build(shape, impl == "reference", a.batch, a.device, kind == "fwd+bwd", a.sampler,
                                a.kernel) for impl in ("reference", "dat-lab")}
            times = alternate(runs, repeats=a.repeats, device=a.device)
            memory = {impl: in_subprocess(__file__, "--device", a.device, "--batch", str(a.batch), "--sampler",
                                          a.sampler, "--kernel", a.kernel, shape, impl, kind)
                      for impl in runs}
            results["rows"].append({"shape": shape, "pass": kind, "reference_ms": times["reference"] * 1e3,
                                    "dat_lab_ms": times["dat-lab"] * 1e3,
                                    "speedup": times["reference"] / times["dat-lab"],
                                    "reference_peak_mb": memory["reference"], "dat_lab_peak_mb": memory["dat-lab"],
                                    "memory_ratio": memory["dat-lab"] / max(memory["reference"], 1e-9)})
    table = markdown(f"Deformable block ({a.device}, batch {a.batch}{options}, medians of {a.repeats})", results["machine"],
                     ["shape", "pass", "reference (ms)", "dat-lab (ms)", "speed-up", "reference peak (MB)",
                      "dat-lab peak (MB)", "memory ratio"],
                     [[r["shape"], r["pass"], f"{r['reference_ms']:.1f}", f"{r['dat_lab_ms']:.1f}", f"{r['speedup']:.2f}x",
                       f"{r['reference_peak_mb']:.1f}", f"{r['dat_lab_peak_mb']:.1f}", f"{r['memory_ratio']:.2f}"]
                      for r in results["rows"]])
    section = f"attention-{a.device}" + options.replace(", ", "-").replace(" ", "-")
    write(results, Path(a.json), Path(a.md) if a.md else None, section, table)


if __name__ == "__main__":
    main()
