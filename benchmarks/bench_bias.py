"""The relative position bias of a deformable block alone (CUDA): grid_sample (the plain path: the
displacement grid, a float32 bias, then the cast to the attention's dtype) against the Triton kernels
of `dat_lab.models.triton_bias`, forward and forward + backward, at DAT-T's stage-2 and stage-3
shapes; the kernels at their default setting and at others, a setting being
TILE/forward warps/backward warps/PRECISION/KEYS/LAYOUT (see triton_bias). Also each setting's
largest error against grid_sample in float32 (bias, table and position gradients).

    python benchmarks/bench_bias.py [--batch 128] [--repeats 20] [--settings 4096/4/4/ieee/16/0,...] [--md docs/benchmarks.md]
    python benchmarks/bench_bias.py --from-json RUN.json --md docs/benchmarks.md   # the table of an earlier run again
    TRITON_INTERPRET=1 python benchmarks/bench_bias.py --device cpu --batch 1 --repeats 1   # a dry run (minutes)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import SHAPES, make_block  # noqa: E402
from common import alternate, machine, markdown, relative_errors, write  # noqa: E402

from dat_lab.models import triton_bias  # noqa: E402
from dat_lab.models.attention import set_deformable_options  # noqa: E402

SETTING = ("TILE", "WARPS", "PRECISION", "KEYS", "LAYOUT")  # the module constants a setting sets, in order


def parse(setting: str) -> tuple:
    tile, forward_warps, backward_warps, precision, keys, layout = setting.split("/")
    return int(tile), (int(forward_warps), int(backward_warps)), precision, int(keys), int(layout)


def current() -> str:
    tile, (fw, bw), precision, keys, layout = (getattr(triton_bias, name) for name in SETTING)
    return f"{tile}/{fw}/{bw}/{precision}/{keys}/{layout}"


def use(setting: str) -> None:
    for name, value in zip(SETTING, parse(setting)):
        setattr(triton_bias, name, value)


def block_and_positions(shape: str, batch: int, device: str, requires_grad: bool):
    block, n = make_block(shape, device), SHAPES[shape]["size"]
    pos = (torch.rand(batch * SHAPES[shape]["groups"], n, n, 2, device=device) * 2 - 1).requires_grad_(requires_grad)
    return block, pos


def build(shape: str, sampler: str, setting: str, batch: int, backward: bool, device: str):
    block, pos = block_and_positions(shape, batch, device, backward)
    set_deformable_options(block, sampler=sampler)
    n = SHAPES[shape]["size"]

    def run() -> None:
        use(setting)
        bias = block._bias(batch, n, n, pos, xy_grid=True, dtype=torch.bfloat16).to(torch.bfloat16)
        if backward:
            bias.backward(torch.ones_like(bias))

    return run


def errors(shape: str, batch: int, setting: str, device: str) -> dict[str, float]:
    """Largest error of the kernels' bias and gradients (float32) against grid_sample's, relative to
    max(1, the largest magnitude), under this setting."""
    block, pos = block_and_positions(shape, batch, device, True)
    n = SHAPES[shape]["size"]
    upstream = torch.randn(batch * SHAPES[shape]["heads"], n * n, n * n, device=device)
    use(setting)
    results = []
    for sampler in ("grid_sample", "triton"):
        block.zero_grad()
        pos.grad = None
        bias = set_deformable_options(block, sampler=sampler)._bias(batch, n, n, pos, xy_grid=True, dtype=torch.float32)
        (bias * upstream).sum().backward()
        results.append({"bias": bias.detach(), "table grad": block.rpe_table.grad, "position grad": pos.grad})
    return relative_errors(results[1], results[0])


def table(results: dict) -> str:
    default = f"triton {results['default']}"
    rows = []
    for row in results["rows"]:
        ms = row["ms"]
        fastest = min((t, n) for n, t in ms.items() if n.startswith("triton"))  # settings differ in the backward only
        rows.append([row["shape"], row["pass"], f"{ms['grid_sample']:.2f}", f"{ms[default]:.2f}",
                     f"{ms['grid_sample'] / ms[default]:.2f}x",
                     f"{fastest[1].removeprefix('triton ')}: {fastest[0]:.2f}" if row["pass"] != "fwd" else "-"])
    header = ["shape", "pass", "grid_sample (ms)", f"triton, {results['default']} (ms)", "speed-up",
              "fastest setting measured (ms)"]
    title = f"Relative position bias ({results['device']}, batch {results['batch']}, bf16 out, medians of {results['repeats']})"
    return markdown(title, results["machine"], header, rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run, in Triton's interpreter")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--settings", default="8192/4/4/ieee/16/0,4096/4/2/ieee/16/0,16384/4/4/ieee/16/0,4096/4/4/ieee/32/0")
    p.add_argument("--json", default="benchmarks/results/bias.json")
    p.add_argument("--from-json", help="only write the table of this earlier run's JSON")
    p.add_argument("--md", help="update this Markdown file's bias section (e.g. docs/benchmarks.md)")
    a = p.parse_args()
    if a.from_json:
        results = json.loads(Path(a.from_json).read_text())
        write(results, Path(a.from_json), Path(a.md) if a.md else None, f"bias-{results['device']}", table(results))
        return
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_bias.py: needs a CUDA device (the Triton kernels run on CUDA; --device cpu: a dry run)")
    default = current()
    settings = [default] + [s for s in a.settings.split(",") if s != default]
    for s in settings:
        parse(s)  # a malformed setting fails here, before any timing
    results = {"machine": machine(a.device), "device": a.device, "batch": a.batch, "repeats": a.repeats,
               "default": default, "rows": [], "errors": {}}
    for shape in SHAPES:
        for kind in ("fwd", "fwd+bwd"):
            runs = {"grid_sample": build(shape, "grid_sample", default, a.batch, kind == "fwd+bwd", a.device)}
            runs |= {f"triton {s}": build(shape, "triton", s, a.batch, kind == "fwd+bwd", a.device) for s in settings}
            times = alternate(runs, repeats=a.repeats, device=a.device, warmup=1)
            results["rows"].append({"shape": shape, "pass": kind, "ms": {n: t * 1e3 for n, t in times.items()}})
            print(shape, kind, {n: round(t * 1e3, 3) for n, t in times.items()}, flush=True)
    for s in settings:
        results["errors"][s] = worst = errors("stage2", min(a.batch, 16), s, a.device)
        print(s, "errors", {k: f"{v:.1e}" for k, v in worst.items()}, flush=True)
    use(default)
    write(results, Path(a.json), Path(a.md) if a.md else None, f"bias-{a.device}", table(results))


if __name__ == "__main__":
    main()
