"""Shared by the tests of the relative-bias kernels (Triton and C): the plain grid_sample path they
must equal, and the comparison."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from dat_lab.models import triton_bias
from dat_lab.models.geometry import displacement

# the Triton kernels' tests run twice: the ones marked `in_interpreter` in a fresh process with
# TRITON_INTERPRET=1 (see run_in_interpreter), the ones marked `outside` in the main run
INTERPRETED = triton_bias.interpreted()
in_interpreter = pytest.mark.skipif(not INTERPRETED, reason="run by test_kernels_in_the_interpreter")
outside = pytest.mark.skipif(INTERPRETED, reason="outside the interpreter only")


def skip_without_triton_op() -> None:
    """Skip the calling test module where Triton or torch.library.triton_op (torch >= 2.6) is missing."""
    pytest.importorskip("triton")
    if not triton_bias.AVAILABLE:
        pytest.skip("torch.library.triton_op needs torch >= 2.6", allow_module_level=True)


def axes(query_grid):
    """The (H, W, 2) query grid's y (H,) and x (W,) coordinates, as the kernels take them (strided
    views: the kernels' ops make them contiguous)."""
    return query_grid[:, 0, 0], query_grid[0, :, 1]


def grid_sample_bias(table, query_grid, pos, groups):
    """The plain path: the (M, Ht, Wt) table per image and group, read by grid_sample at half of query - key."""
    M, Ht, Wt = table.shape
    N = pos.shape[0]
    per_group = table.reshape(1, groups, M // groups, Ht, Wt).expand(N // groups, -1, -1, -1, -1)
    grid = displacement(query_grid, pos).flip(-1)  # (N, HW, Ns, 2) as (x, y)
    bias = F.grid_sample(per_group.reshape(N, M // groups, Ht, Wt), grid, mode="bilinear", align_corners=True)
    return bias.reshape(N * M // groups, -1, pos.shape[1] * pos.shape[2])


def bias_and_gradients(bias_fn, table, query_grid, pos, groups, upstream):
    """bias_fn(table, query_grid, pos, groups) and the gradients of table and positions of sum(bias * upstream)."""
    bias = bias_fn(table, query_grid, pos, groups)
    return (bias.detach(), *torch.autograd.grad(bias, (table, pos), upstream))


def assert_close(actual, expected, name=""):
    """Equal to 1e-5 of the tensor's scale (max |expected|, at least 1): a gradient summed over many
    positions carries float32 rounding of that order in its small entries, so no elementwise rtol."""
    assert actual.shape == expected.shape, name
    scale = max(1.0, expected.abs().max().item())
    assert (actual - expected).abs().max().item() <= 1e-5 * scale, name


def reference_and_fast(model, x, **options):
    """Logits and parameter gradients (of the logits' squares summed) of `model` on x with the plain
    released formulation, then with the fast path under `options`: two dicts by name."""
    from dat_lab.models.attention import set_deformable_options

    passes = []
    for settings in ({"reference": True}, {"reference": False, **options}):
        model.zero_grad()
        logits = set_deformable_options(model, **settings)(x)
        logits.square().sum().backward()
        passes.append({"logits": logits.detach(), **{n: p.grad.clone() for n, p in model.named_parameters()}})
    return passes


def run_in_interpreter(path, outside: int):
    """Run the test file at path again in a fresh process with TRITON_INTERPRET=1 (the interpreter must
    be on before triton is imported); all its tests pass but the `outside` ones, which skip there."""
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(path)],
                         env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert f" passed, {outside} skipped" in run.stdout, run.stdout[-2000:]


def compile_for_h100(fn, pointers: dict, constexprs: dict, warps: int):
    """The Triton kernel fn compiled by the real Triton compiler (not the interpreter) for sm_90, without a
    GPU: pointers names the pointer (and float) arguments' types, the others are int32."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: "constexpr" if name in constexprs else pointers.get(name, "i32") for name in fn.arg_names}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
