"""The relative position bias of a deformable block alone (CUDA): grid_sample (the plain path: the
displacement grid, a float32 bias, then the cast to the attention's dtype) against the Triton kernels
of `dat_lab.models.triton_bias`, forward and forward + backward, at DAT-T's stage-2 and stage-3
shapes; the kernels at several launch settings (table tile / forward warps / backward warps).

    python benchmarks/bench_bias.py [--batch 128] [--repeats 20] [--configs 8192/4/8,4096/4/4] [--md docs/benchmarks.md]
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


def build(shape: str, sampler: str, batch: int, backward: bool, config: tuple[int, int, int] | None, device: str):
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
            triton_bias.TILE, triton_bias.WARPS = config[0], config[1:]
        bias = block._bias(batch, n, n, pos, xy_grid=True, dtype=torch.bfloat16).to(torch.bfloat16)
        if backward:
            bias.backward(torch.ones_like(bias))

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run, in Triton's interpreter")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--configs", default="8192/4/8,4096/4/4,16384/4/8,8192/8/4")
    p.add_argument("--json", default="benchmarks/results/bias.json")
    p.add_argument("--md", help="update this Markdown file's bias section (e.g. docs/benchmarks.md)")
    a = p.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_bias.py: needs a CUDA device (the Triton kernels run on CUDA; --device cpu: a dry run)")
    configs = {f"triton {c}": tuple(int(v) for v in c.split("/")) for c in a.configs.split(",")}
    default = (triton_bias.TILE, *triton_bias.WARPS)
    results = {"machine": machine(a.device), "batch": a.batch, "default": "/".join(map(str, default)), "rows": []}
    rows = []
    for shape in SHAPES:
        for kind in ("fwd", "fwd+bwd"):
            runs = {"grid_sample": build(shape, "grid_sample", a.batch, kind == "fwd+bwd", None, a.device)}
            runs |= {name: build(shape, "triton", a.batch, kind == "fwd+bwd", c, a.device) for name, c in configs.items()}
            times = alternate(runs, repeats=a.repeats, device=a.device, warmup=1)
            triton_bias.TILE, triton_bias.WARPS = default[0], default[1:]
            best = min((t, n) for n, t in times.items() if n != "grid_sample")
            results["rows"].append({"shape": shape, "pass": kind, "ms": {n: t * 1e3 for n, t in times.items()}})
            rows.append([shape, kind, f"{times['grid_sample'] * 1e3:.2f}", best[1].removeprefix("triton "),
                         f"{best[0] * 1e3:.2f}", f"{times['grid_sample'] / best[0]:.2f}x"])
            print(shape, kind, {n: round(t * 1e3, 3) for n, t in times.items()}, flush=True)
    header = ["shape", "pass", "grid_sample (ms)", "fastest kernel setting", "triton (ms)", "speed-up"]
    table = markdown(f"Relative position bias ({a.device}, batch {a.batch}, bf16 out, medians of {a.repeats})",
                     results["machine"], header, rows)
    write(results, Path(a.json), Path(a.md) if a.md else None, f"bias-{a.device}", table)


if __name__ == "__main__":
    main()
