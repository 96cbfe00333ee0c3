"""The Triton kernels of the relative position bias (used on CUDA), checked on the CPU in Triton's
interpreter: against grid_sample, the plain path, in values and gradients, and inside the model.

The interpreter must be on before triton is imported, so `test_kernels_in_the_interpreter` runs this
file again in a fresh process with TRITON_INTERPRET=1; in the main run the other tests skip.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import dat_lab
from dat_lab.models import triton_bias
from dat_lab.models.geometry import displacement, grid_points

pytest.importorskip("triton")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
in_interpreter = pytest.mark.skipif(not INTERPRETED, reason="run by test_kernels_in_the_interpreter")


@pytest.fixture
def interpreted():
    return triton_bias


@pytest.mark.skipif(INTERPRETED, reason="this is the run it starts")
def test_kernels_in_the_interpreter():
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                         env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed, 2 skipped" in run.stdout and "failed" not in run.stdout, run.stdout[-2000:]


def _axes(query_grid):
    """The (H, W, 2) query grid's y (H,) and x (W,) coordinates, as the kernels take them."""
    return query_grid[:, 0, 0].contiguous(), query_grid[0, :, 1].contiguous()


def _grid_sample_bias(table, query_grid, pos, groups):
    """The plain path: the (M, Ht, Wt) table per image and group, read by grid_sample at half of query - key."""
    M, Ht, Wt = table.shape
    N = pos.shape[0]
    per_group = table.reshape(1, groups, M // groups, Ht, Wt).expand(N // groups, -1, -1, -1, -1)
    grid = displacement(query_grid, pos).flip(-1)  # (N, HW, Ns, 2) as (x, y)
    bias = F.grid_sample(per_group.reshape(N, M // groups, Ht, Wt), grid, mode="bilinear", align_corners=True)
    return bias.reshape(N * M // groups, -1, pos.shape[1] * pos.shape[2])


@in_interpreter
@pytest.mark.parametrize("H, W, Hk, Wk, groups, layout, tile", [
    (4, 4, 4, 4, 2, 0, 16384), (4, 4, 4, 4, 2, 1, 16384), (5, 7, 3, 4, 1, 0, 512), (3, 6, 6, 5, 3, 1, 512)])
def test_kernels_equal_grid_sample(interpreted, H, W, Hk, Wk, groups, layout, tile, monkeypatch):
    """Values and the gradients of table and positions, positions reaching past the table's edges
    (zero padding) and sitting on whole pixels (the slope towards the next one, as grid_sample)."""
    monkeypatch.setattr(interpreted, "LAYOUT", layout)
    monkeypatch.setattr(interpreted, "TILE", tile)  # 512: the backward takes query columns 2 at a time
    torch.manual_seed(0)
    M, N = 2 * groups, 2 * groups
    table = torch.randn(M, 2 * H - 1, 2 * W - 1, requires_grad=True)
    query_grid = grid_points(H, W)
    pos = torch.rand(N, Hk, Wk, 2) * 2.4 - 1.2
    pos[0] = grid_points(Hk, Wk, convention="aligned")  # whole pixels of the table
    pos.requires_grad_()
    upstream = torch.randn(N * M // groups, H * W, Hk * Wk)
    results = []
    def kernels(table, query_grid, pos, groups):
        return interpreted.relative_bias(table, *_axes(query_grid), pos, groups=groups, dtype=torch.float32)

    for bias_fn in (_grid_sample_bias, kernels):
        table.grad = pos.grad = None
        bias = bias_fn(table, query_grid, pos, groups)
        (bias * upstream).sum().backward()
        results.append((bias.detach(), table.grad, pos.grad))
    for (name, expected), actual in zip(zip(("bias", "table grad", "position grad"), results[0]), results[1]):
        assert actual.shape == expected.shape, name
        assert (actual - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max().item()), name
    assert results[1][2][0].abs().sum() > 0  # whole pixels still pass a gradient


@in_interpreter
def test_kernels_write_the_asked_dtype(interpreted):
    table, pos = torch.randn(4, 7, 7), torch.rand(2, 3, 3, 2) * 2 - 1
    bias = interpreted.relative_bias(table, *_axes(grid_points(4, 4)), pos, groups=2, dtype=torch.bfloat16)
    assert bias.dtype == torch.bfloat16 and bias.shape == (4, 16, 9) and bias.stride() == (256, 16, 1)  # rows padded
    torch.testing.assert_close(bias.float(), _grid_sample_bias(table, grid_points(4, 4), pos, 2), atol=2e-2, rtol=1e-2)
    # the backward reads a gradient with padded rows (as SDPA gives it) as it lies
    qy, qx = _axes(grid_points(4, 4))
    padded = torch.randn(4, 16, 16)[..., :9]
    for by_rows, whole in zip(interpreted._bias_backward(padded, table, qy, qx, pos, 2),
                              interpreted._bias_backward(padded.contiguous(), table, qy, qx, pos, 2)):
        torch.testing.assert_close(by_rows, whole, atol=0, rtol=0)


@in_interpreter
@pytest.mark.parametrize("knob", [{}, {"offset_range": -1.0}, {"key_downsample": [1, 1, 2, 1]}, {"reference": "aligned"}])
def test_model_with_triton_bias_equals_the_reference(interpreted, knob, monkeypatch):
    """dat_pico with sampler "triton" against the released formulation: logits and all gradients."""
    from dat_lab.models.attention import set_deformable_options

    calls = []
    kernels = interpreted.relative_bias
    monkeypatch.setattr(interpreted, "relative_bias", lambda *a, **k: calls.append(1) or kernels(*a, **k))
    torch.manual_seed(0)
    model = dat_lab.create_model("dat_pico", **knob).eval()
    x = torch.randn(2, 3, 32, 32)
    passes = []
    for options in ({"reference": True}, {"reference": False, "sampler": "triton"}):
        model.zero_grad()
        logits = set_deformable_options(model, **options)(x)
        logits.square().sum().backward()
        passes.append({"logits": logits.detach(), **{n: p.grad.clone() for n, p in model.named_parameters()}})
    assert len(calls) == 2  # the two deformable blocks of dat_pico, in the second pass
    for name, expected in passes[0].items():
        assert (passes[1][name] - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max().item()), name


@pytest.mark.skipif(INTERPRETED, reason="outside the interpreter only")
def test_kernels_refuse_the_cpu_outside_the_interpreter():
    with pytest.raises(RuntimeError, match="sampler 'triton': the Triton kernels run on CUDA devices, not cpu"):
        triton_bias.relative_bias(torch.randn(2, 7, 7), *_axes(grid_points(4, 4)), torch.zeros(2, 3, 3, 2), groups=2,
                                  dtype=torch.float32)
