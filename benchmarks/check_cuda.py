"""Checks of the deformable block on a CUDA device (CI has none; run by hand where a GPU is lent):

1. the Triton bias as bf16 training runs it (bf16 bias and incoming gradient: the dots backward, tf32
   products; or --setting) against grid_sample given the same rounded gradient, at DAT-T's stage-2
   shape, for a fresh table and one moved 3 from zero: within 1e-2 relative to the largest magnitude (CUDA only);
2. the fast path (auto: the relative bias by the Triton kernels, keys by grid_sample, SDPA; grid_sample
   for the bias too; dense sampler; matmul kernel; the fused Triton attention, kernel "triton") against the reference
   formulation, float32 with TF32 off: logits and every gradient, the largest error relative to
   max(1, the tensor's largest magnitude);
3. deterministic training: with torch.use_deterministic_algorithms(True) (Lightning's
   deterministic=True) two forward+backward passes give bit-identical gradients (SDPA and kernel "triton");
4. torch.compile: graph breaks and graph count of dat_tiny (torch._dynamo.explain) in float32 and under
   bf16 autocast with channels_last (also with kernel "triton"), and a compiled forward+backward of
   dat_pico against eager (--only graphs: the graph breaks alone).

    python benchmarks/check_cuda.py [--model dat_tiny] [--device cpu] [--setting DOTS_KEYS=8]   # cpu: a dry run

Prints one line per check and exits 1 if any fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what Lightning sets for deterministic runs

import torch  # noqa: E402

import dat_lab  # noqa: E402
from dat_lab.models.attention import set_deformable_options  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_bias import errors, parse, use  # noqa: E402
from common import relative_errors  # noqa: E402

KNOBS = {"default": {}, "position_none": {"position": "none"}, "position_fixed": {"position": "fixed"},
         "position_log_cpb": {"position": "log_cpb"}, "unbounded": {"offset_range": -1.0},
         "r2": {"key_downsample": [1, 1, 2, 1]}}
PATHS = {"auto": {}, "grid_sample": {"sampler": "grid_sample"}, "dense": {"sampler": "dense"},
         "matmul": {"kernel": "matmul"}, "triton": {"kernel": "triton"}}  # triton: CUDA only
failures: list[str] = []
DEVICE = "cuda"  # --device cpu: a dry run of this script where no GPU is


def check(name: str, ok: bool, detail: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        failures.append(name)


def grads(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    x.grad = None
    logits = model(x)
    logits.square().sum().backward()
    return {"logits": logits.detach(), "input": x.grad.clone(),
            **{n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}}


def worst_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    errors = relative_errors(a, b)
    name = max(errors, key=errors.get)
    return errors[name], name


def equivalence() -> None:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    for knob, kwargs in KNOBS.items():
        torch.manual_seed(0)
        model = dat_lab.create_model("dat_pico", **kwargs).to(DEVICE).eval()
        x = torch.randn(4, 3, 32, 32, device=DEVICE, requires_grad=True)
        ref = grads(set_deformable_options(model, reference=True), x)
        for path, options in PATHS.items():
            if path == "triton" and DEVICE != "cuda":
                continue
            set_deformable_options(model, reference=False, sampler="auto", kernel="auto")
            error, where = worst_error(grads(set_deformable_options(model, **options), x), ref)
            check(f"fast path {path} = reference [{knob}]", error <= 1e-5, f"max error {error:.1e} ({where})")


def determinism() -> None:
    torch.use_deterministic_algorithms(True)
    try:
        for kernel in ("auto", "triton") if DEVICE == "cuda" else ("auto",):
            torch.manual_seed(0)
            model = set_deformable_options(dat_lab.create_model("dat_pico").to(DEVICE).train(), kernel=kernel)
            x = torch.randn(8, 3, 32, 32, device=DEVICE, requires_grad=True)
            runs = []
            for _ in range(2):
                torch.manual_seed(1)  # same drop-path draws
                runs.append(grads(model, x))
            same = all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])
            check(f"deterministic forward+backward (auto sampler -> dense keys, Triton bias; kernel {kernel})", same,
                  "bit-identical gradients" if same else "gradients differ between two runs")
    finally:
        torch.use_deterministic_algorithms(False)


def graphs(name: str) -> None:
    """Graph breaks of `name` in training mode, in float32 and as bf16 training runs it (autocast,
    channels_last)."""
    import torch._dynamo

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    hows = ("float32", "bf16 autocast, channels_last") + (("bf16 autocast, channels_last, kernel triton",)
                                                           if DEVICE == "cuda" else ())
    for how in hows:
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = dat_lab.create_model(name).to(DEVICE).train()
        set_deformable_options(model, kernel="triton" if how.endswith("triton") else "auto")
        x = torch.randn(2, 3, 224, 224, device=DEVICE, requires_grad=True)
        if how != "float32":
            model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=how != "float32"):
            explanation = torch._dynamo.explain(model)(x)
        check(f"torch.compile {name} ({how}): no graph break", explanation.graph_break_count == 0,
              f"{explanation.graph_count} graph(s), {explanation.graph_break_count} break(s) "
              f"{[str(r.reason)[:300] for r in explanation.break_reasons]}")


def compiled(name: str) -> None:
    import torch._dynamo

    graphs(name)
    torch._dynamo.reset()
    torch.manual_seed(0)  # the compiled pass on the small model: compiling dat_tiny's backward takes minutes
    model = dat_lab.create_model("dat_pico").to(DEVICE).eval()  # eval: no drop path draws
    x = torch.randn(4, 3, 32, 32, device=DEVICE, requires_grad=True)
    eager = grads(model, x)
    with torch.autocast(DEVICE, enabled=False):
        error, where = worst_error(grads(torch.compile(model), x), eager)
    check("torch.compile dat_pico: compiled = eager", error <= 1e-4, f"max error {error:.1e} ({where})")


def bf16_bias(setting: str) -> None:
    try:
        for offset in (0.0, 3.0):  # a table far from zero too, as a trained one may be
            worst = errors("stage2", 16, setting, DEVICE, torch.bfloat16, offset=offset)
            name = max(worst, key=worst.get)
            check(f"Triton bias [{setting}], bf16 gradient, table + {offset:g} = grid_sample", worst[name] <= 1e-2,
                  f"max error {worst[name]:.1e} ({name}); " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    finally:
        use("default")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dat_tiny")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--setting", default="default", help="of the Triton bias kernels for the bf16 check "
                   "(bench_bias.py's notation)")
    p.add_argument("--only", choices=["graphs"], help="graphs: only the graph-break check (torch._dynamo.explain)")
    a = p.parse_args()
    parse(a.setting)  # a malformed setting fails here, in one line, before any check
    global DEVICE
    DEVICE = a.device
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}", flush=True)
    steps = ((lambda: bf16_bias(a.setting),) if DEVICE == "cuda" else ()) + (equivalence, determinism,
                                                                            lambda: compiled(a.model))
    if a.only == "graphs":
        steps = (lambda: graphs(a.model),)
    for step in steps:
        try:
            step()
        except Exception:  # report and go on: one run should say as much as it can
            traceback.print_exc()
            failures.append(getattr(step, "__name__", "step"))
    print("all checks passed" if not failures else f"failed: {', '.join(failures)}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
