"""The relative position bias of a deformable block alone (CUDA): grid_sample (the plain path: the
displacement grid, a float32 bias, then the cast to the attention's dtype) against the Triton kernels
of `dat_lab.models.triton_bias`, forward and forward + backward, at DAT-T's stage-2 and stage-3
shapes; the kernels at several settings (table tile / forward warps / backward warps / precision of
the table gradient's products / keys per backward program / layout of its column weights).

    python benchmarks/bench_bias.py [--batch 128] [--repeats 20] [--configs 8192/4/8/ieee/32/0,16384/4/4/ieee/64/1] [--md docs/benchmarks.md]
    TRITON_INTERPRET=1 python benchmarks/bench_bias.py --device cpu --batch 1 --repeats 1   # a dry run of the script
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import SHAPES  # noqa: E402
from common import alternate, machine, markdown, write  # noqa: E402

from dat_lab.models import StageConfig, triton_bias  # noqa: E402
from dat_lab.models.attention import DeformableAttention, set_deformable_options  # noqa: E402


def build(shape: str, sampler: str, batch: int, backward: bool, config: tuple | None, device: str):
    s = SHAPES[shape]
    torch.manual_seed(0)
    stage = StageConfig(dim=s["dim"], depth=2, heads=s["heads"], blocks="LD", groups=s["groups"],
                        offset_kernel=s["kernel"])
    block = DeformableAttention(stage=stage, q_size=(s["size"], s["size"]), attn_drop=0.0, proj_drop=0.0).to(device)
    set_deformable_options(block, sampler=sampler)
    n = s["size"]
    pos = (torch.rand(batch * s["groups"], n, n, 2, device=device) * 2 - 1).requires_grad_(backward)

    def run() -> None:
        if config is not None:
            triton_bias.TILE, triton_bias.WARPS, triton_bias.PRECISION, triton_bias.KEYS, triton_bias.LAYOUT = config
        bias = block._bias(batch, n, n, pos, xy_grid=True, dtype=torch.bfloat16).to(torch.bfloat16)
        if backward:
            bias.backward(torch.ones_like(bias))

    return run


def errors(shape: str, batch: int, config: tuple, device: str) -> dict[str, float]:
    """Largest error of the kernels' bias and gradients (float32) against grid_sample's, relative to
    max(1, the largest magnitude), under this setting."""
    s, n = SHAPES[shape], SHAPES[shape]["size"]
    torch.manual_seed(0)
    stage = StageConfig(dim=s["dim"], depth=2, heads=s["heads"], blocks="LD", groups=s["groups"])
    block = DeformableAttention(stage=stage, q_size=(n, n), attn_drop=0.0, proj_drop=0.0).to(device)
    pos = (torch.rand(batch * s["groups"], n, n, 2, device=device) * 2 - 1).requires_grad_()
    upstream = torch.randn(batch * s["heads"], n * n, n * n, device=device)
    results = []
    for sampler in ("grid_sample", "triton"):
        triton_bias.TILE, triton_bias.WARPS, triton_bias.PRECISION, triton_bias.KEYS, triton_bias.LAYOUT = config
        block.zero_grad()
        pos.grad = None
        bias = set_deformable_options(block, sampler=sampler)._bias(batch, n, n, pos, xy_grid=True, dtype=torch.float32)
        (bias * upstream).sum().backward()
        results.append({"bias": bias.detach(), "table grad": block.rpe_table.grad, "position grad": pos.grad})
    return {k: ((results[1][k] - v).abs().max() / v.abs().max().clamp_min(1)).item() for k, v in results[0].items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run, in Triton's interpreter")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--configs", default="8192/4/4/ieee/16/0,4096/4/4/ieee/16/0,8192/4/2/ieee/16/0,4096/4/2/ieee/16/0,"
                                        "16384/4/4/ieee/16/0,4096/4/4/ieee/32/0,8192/4/2/ieee/32/0")
    p.add_argument("--json", default="benchmarks/results/bias.json")
    p.add_argument("--md", help="update this Markdown file's bias section (e.g. docs/benchmarks.md)")
    a = p.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_bias.py: needs a CUDA device (the Triton kernels run on CUDA; --device cpu: a dry run)")
    configs = {}
    for c in a.configs.split(","):
        tile, forward_warps, backward_warps, precision, keys, layout = c.split("/")
        configs[f"triton {c}"] = (int(tile), (int(forward_warps), int(backward_warps)), precision, int(keys), int(layout))
    default = (triton_bias.TILE, triton_bias.WARPS, triton_bias.PRECISION, triton_bias.KEYS, triton_bias.LAYOUT)
    results = {"machine": machine(a.device), "batch": a.batch, "default": str(default), "rows": []}
    rows = []
    for shape in SHAPES:
        for kind in ("fwd", "fwd+bwd"):
            runs = {"grid_sample": build(shape, "grid_sample", a.batch, kind == "fwd+bwd", None, a.device)}
            runs |= {name: build(shape, "triton", a.batch, kind == "fwd+bwd", c, a.device) for name, c in configs.items()}
            times = alternate(runs, repeats=a.repeats, device=a.device, warmup=1)
            triton_bias.TILE, triton_bias.WARPS, triton_bias.PRECISION, triton_bias.KEYS, triton_bias.LAYOUT = default
            best = min((t, n) for n, t in times.items() if n != "grid_sample")
            results["rows"].append({"shape": shape, "pass": kind, "ms": {n: t * 1e3 for n, t in times.items()}})
            rows.append([shape, kind, f"{times['grid_sample'] * 1e3:.2f}", best[1].removeprefix("triton "),
                         f"{best[0] * 1e3:.2f}", f"{times['grid_sample'] / best[0]:.2f}x"])
            print(shape, kind, {n: round(t * 1e3, 3) for n, t in times.items()}, flush=True)
    for name, config in configs.items():
        results[f"errors {name}"] = worst = errors("stage2", min(a.batch, 16), config, a.device)
        print(name, "errors", {k: f"{v:.1e}" for k, v in worst.items()}, flush=True)
    triton_bias.TILE, triton_bias.WARPS, triton_bias.PRECISION, triton_bias.KEYS, triton_bias.LAYOUT = default
    header = ["shape", "pass", "grid_sample (ms)", "fastest kernel setting", "triton (ms)", "speed-up"]
    table = markdown(f"Relative position bias ({a.device}, batch {a.batch}, bf16 out, medians of {a.repeats})",
                     results["machine"], header, rows)
    write(results, Path(a.json), Path(a.md) if a.md else None, f"bias-{a.device}", table)


if __name__ == "__main__":
    main()
