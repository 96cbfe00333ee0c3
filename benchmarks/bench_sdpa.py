"""The deformable block's fused attention alone: `scaled_dot_product_attention` with the relative bias as
its mask (bf16, a bias that needs a gradient, q, k, v as the block lays them out: head views of
token-major tensors, the mask's rows padded to 16), forward + backward, under each SDPA backend that
takes the case, at DAT-T's stage-2 and stage-3 shapes; and without a mask (flash attention where it
applies), the floor a fused bias could reach. Also the kernels the default backend runs. For the
question session 7 left: which backend does PyTorch pick for the masked case on an H100/H200, and
would forcing another one pay.

    python benchmarks/bench_sdpa.py [--batch 128] [--repeats 20] [--md docs/benchmarks.md]
    python benchmarks/bench_sdpa.py --device cpu --batch 2 --repeats 1   # a dry run (math only there)
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import SHAPES  # noqa: E402
from common import add_output_options, alternate, machine, markdown, write  # noqa: E402

BACKENDS = {"default": None, "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "math": SDPBackend.MATH}


def operands(shape: str, batch: int, device: str, masked: bool) -> tuple[torch.Tensor, ...]:
    """q (B, M, HW, hc), k and v (B, M, Ns, hc) as head views of (B, N, C) tensors; the bias
    (B, M, HW, Ns) a view of rows padded to 16 (as triton_bias writes it), or None."""
    s, dtype = SHAPES[shape], torch.bfloat16
    B, C, M, n = batch, s["dim"], s["heads"], s["size"] ** 2
    q, k, v = (torch.randn(B, n, C, device=device, dtype=dtype).view(B, n, M, C // M).transpose(1, 2)
               .requires_grad_() for _ in range(3))
    if not masked:
        return q, k, v, None
    bias = torch.randn(B, M, n, -(-n // 16) * 16, device=device, dtype=dtype)[..., :n].requires_grad_()
    return q, k, v, bias


def step(shape: str, batch: int, device: str, backend: str | None, masked: bool):
    """One forward + backward under `backend` (None: PyTorch's choice)."""
    q, k, v, bias = operands(shape, batch, device, masked)
    scale = (q.shape[-1]) ** -0.5

    def run() -> None:
        with sdpa_kernel([BACKENDS[backend]]) if BACKENDS[backend] else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
        out.backward(torch.ones_like(out))

    run()  # a backend that cannot take the case raises here, before the timing
    return run


def kernels(fn, device: str, rows: int = 6) -> list[str]:
    """Names of the device kernels one call runs, longest first."""
    activity = torch.profiler.ProfilerActivity.CUDA if device == "cuda" else torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[activity]) as prof:
        fn()
    key = "device_time_total" if device == "cuda" else "cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)
    return [e.key[:90] for e in events[:rows]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=20)
    add_output_options(p, "sdpa", "SDPA")
    a = p.parse_args()
    results = {"machine": machine(a.device), "device": a.device, "batch": a.batch, "rows": [], "kernels": {}}
    for shape in SHAPES:
        runs, failed = {}, {}
        for backend in BACKENDS:
            try:
                runs[backend] = step(shape, a.batch, a.device, backend, masked=True)
            except RuntimeError as err:  # this backend does not take the case
                failed[backend] = str(err).splitlines()[0][:120]
        runs["no mask (default)"] = step(shape, a.batch, a.device, "default", masked=False)
        times = alternate(runs, repeats=a.repeats, device=a.device)
        results["kernels"][shape] = kernels(runs["default"], a.device)
        row = {"shape": shape, "ms": {n: t * 1e3 for n, t in times.items()}, "not_taken": failed}
        print(shape, {n: round(t * 1e3, 3) for n, t in times.items()}, failed, results["kernels"][shape], flush=True)
        results["rows"].append(row)
    names = [*BACKENDS, "no mask (default)"]
    table = markdown(f"SDPA with the relative bias, forward + backward ({a.device}, batch {a.batch}, bf16, "
                     f"medians of {a.repeats})", results["machine"], ["shape", *(f"{n} (ms)" for n in names)],
                     [[r["shape"], *(f"{r['ms'][n]:.3f}" if n in r["ms"] else "n/a" for n in names)]
                      for r in results["rows"]])
    table += "\n\nKernels of the default backend (masked): " + "; ".join(
        f"{shape}: {', '.join(ks)}" for shape, ks in results["kernels"].items())
    write(results, Path(a.json), Path(a.md) if a.md else None, f"sdpa-{a.device}", table)


if __name__ == "__main__":
    main()
