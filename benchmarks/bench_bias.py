"""The relative position bias of a deformable block alone (CUDA): grid_sample (the plain path: the
displacement grid, a float32 bias, then the cast to the attention's dtype) against the Triton kernels
of `dat_lab.models.triton_bias`, forward and forward + backward, at DAT-T's stage-2 and stage-3
shapes; the kernels at their default setting and at others, a setting being changes to the module
constants of triton_bias, NAME=VALUE joined by "/" (e.g. BACKWARD=loop/PRECISION=ieee; WARPS=4:2). Also
each setting's largest error against grid_sample (bias, table and position gradients), in float32 and
with a bf16 incoming gradient (the products then in tf32 under PRECISION "auto").

    python benchmarks/bench_bias.py [--batch 128] [--repeats 20] [--settings BACKWARD=loop ...] [--md docs/benchmarks.md]
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
from common import add_output_options, alternate, machine, markdown, relative_errors, write  # noqa: E402

from dat_lab.models import triton_bias  # noqa: E402
from dat_lab.models.attention import set_deformable_options  # noqa: E402

TUNABLES = ("TILE", "WARPS", "PRECISION", "KEYS", "LAYOUT", "BACKWARD", "DOTS_KEYS", "DOTS_BLOCKS", "DOTS_WARPS")
DEFAULTS = {name: getattr(triton_bias, name) for name in TUNABLES}  # "default": the module as it ships


def parse(setting: str) -> dict:
    """"default" -> {}; "BACKWARD=loop/WARPS=4:2" -> {"BACKWARD": "loop", "WARPS": (4, 2)}."""
    if setting == "default":
        return {}
    changes = {}
    for item in setting.split("/"):
        name, _, value = item.partition("=")
        try:
            if name not in TUNABLES or not value:
                raise ValueError
            kind = type(DEFAULTS[name])  # the constant's own: int, str, or the (forward, backward) WARPS
            changes[name] = tuple(map(int, value.split(":"))) if kind is tuple else kind(value)
            if kind is tuple and len(changes[name]) != 2:
                raise ValueError
        except ValueError:
            raise SystemExit(f"bench_bias.py: setting {setting!r}: {item!r} is not NAME=VALUE with NAME one of "
                             f"{', '.join(TUNABLES)} (WARPS=forward:backward, e.g. WARPS=4:2)") from None
    return changes


def use(setting: str) -> None:
    for name, value in (DEFAULTS | parse(setting)).items():
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


def errors(shape: str, batch: int, setting: str, device: str, dtype: torch.dtype,
           offset: float = 0.0) -> dict[str, float]:
    """Largest error of the kernels' bias and gradients against grid_sample's (float32), relative to
    max(1, the largest magnitude), under this setting; the kernels' bias in `dtype`, and so the
    incoming gradient (rounded to it for grid_sample too); the table moved `offset` from zero."""
    block, pos = block_and_positions(shape, batch, device, True)
    with torch.no_grad():
        block.rpe_table.add_(offset)
    n = SHAPES[shape]["size"]
    upstream = torch.randn(batch * SHAPES[shape]["heads"], n * n, n * n, device=device).to(dtype)
    use(setting)
    results = []
    for sampler in ("grid_sample", "triton"):
        block.zero_grad()
        pos.grad = None
        bias = set_deformable_options(block, sampler=sampler)._bias(batch, n, n, pos, xy_grid=True, dtype=dtype)
        bias.backward(upstream.to(bias.dtype))
        results.append({"bias": bias.detach().float(), "table grad": block.rpe_table.grad, "position grad": pos.grad})
    return relative_errors(results[1], results[0])


def works(setting: str, batch: int, device: str) -> bool:
    """Whether the kernels run under this setting (forward and backward, both shapes); a one-line
    report and False if not, so that one setting that fails to compile drops out alone."""
    try:
        for shape in SHAPES:
            build(shape, "triton", setting, batch, True, device)()
        return True
    except Exception as e:  # noqa: BLE001 - report and go on
        print(f"setting {setting} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
        return False


def table(results: dict) -> str:
    default = f"triton {results['default']}"
    rows = []
    for row in results["rows"]:
        ms = row["ms"]
        fastest = min((t, n) for n, t in ms.items() if n.startswith("triton"))  # settings differ in the backward only
        rows.append([row["shape"], row["pass"], f"{ms['grid_sample']:.2f}", f"{ms[default]:.2f}",
                     f"{ms['grid_sample'] / ms[default]:.2f}x",
                     f"{fastest[1].removeprefix('triton ')}: {fastest[0]:.2f}" if row["pass"] != "fwd" else "-"])
    header = ["shape", "pass", "grid_sample (ms)", f"triton, {results['default']} setting (ms)", "speed-up",
              "fastest setting measured (ms)"]
    title = f"Relative position bias ({results['device']}, batch {results['batch']}, bf16 out, medians of {results['repeats']})"
    return markdown(title, results["machine"], header, rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run, in Triton's interpreter")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--settings", nargs="*", default=["BACKWARD=loop/PRECISION=ieee", "BACKWARD=loop", "DOTS_KEYS=2",
                                                        "DOTS_WARPS=8", "DOTS_KEYS=8/DOTS_BLOCKS=4/DOTS_WARPS=8"])
    add_output_options(p, "bias")
    p.add_argument("--from-json", help="only write the table of this earlier run's JSON")
    a = p.parse_args()
    if a.from_json:
        results = json.loads(Path(a.from_json).read_text())
        write(results, Path(a.from_json), Path(a.md) if a.md else None, f"bias-{results['device']}", table(results))
        return
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_bias.py: needs a CUDA device (the Triton kernels run on CUDA; --device cpu: a dry run)")
    settings = ["default"] + [s for s in a.settings if s != "default"]
    for s in settings:
        parse(s)  # a malformed setting fails here, before any timing
    settings = [s for s in settings if works(s, min(a.batch, 2), a.device)]
    if not settings:
        sys.exit("bench_bias.py: no setting ran")
    default = settings[0]  # "default" unless it failed
    results = {"machine": machine(a.device), "device": a.device, "batch": a.batch, "repeats": a.repeats,
               "default": default, "constants": {n: str(v) for n, v in DEFAULTS.items()}, "rows": [], "errors": {}}
    for shape in SHAPES:
        for kind in ("fwd", "fwd+bwd"):
            runs = {"grid_sample": build(shape, "grid_sample", default, a.batch, kind == "fwd+bwd", a.device)}
            runs |= {f"triton {s}": build(shape, "triton", s, a.batch, kind == "fwd+bwd", a.device) for s in settings}
            times = alternate(runs, repeats=a.repeats, device=a.device, warmup=1)
            results["rows"].append({"shape": shape, "pass": kind, "ms": {n: t * 1e3 for n, t in times.items()}})
            print(shape, kind, {n: round(t * 1e3, 3) for n, t in times.items()}, flush=True)
    for s in settings:
        for dtype, offset in ((torch.float32, 0.0), (torch.bfloat16, 0.0), (torch.bfloat16, 3.0)):
            case = f"{s} {str(dtype)[6:]}" + (f" table+{offset:g}" if offset else "")
            results["errors"][case] = worst = errors("stage2", min(a.batch, 16), s, a.device, dtype, offset)
            print(case, "errors", {k: f"{v:.1e}" for k, v in worst.items()}, flush=True)
    use(default)
    write(results, Path(a.json), Path(a.md) if a.md else None, f"bias-{a.device}", table(results))


if __name__ == "__main__":
    main()
