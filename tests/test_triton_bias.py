"""The Triton kernels of the relative position bias (used on CUDA), checked on the CPU in Triton's
interpreter: against grid_sample, the plain path, in values and gradients, and inside the model.

The interpreter must be on before triton is imported, so `test_kernels_in_the_interpreter` runs this
file again in a fresh process with TRITON_INTERPRET=1; in the main run the other tests skip.
"""

import pytest
import torch

import dat_lab
from dat_lab.models import triton_bias
from dat_lab.models.attention import set_deformable_options
from dat_lab.models.geometry import grid_points

from bias_reference import (assert_close, axes, bias_and_gradients, compile_for_h100, grid_sample_bias,
                            in_interpreter, outside, reference_and_fast, run_in_interpreter, skip_without_triton_op)

skip_without_triton_op()


@outside
def test_kernels_in_the_interpreter():
    run_in_interpreter(__file__, outside=6)


def kernels(table, query_grid, pos, groups):
    """The Triton kernels' float32 bias, called as grid_sample_bias is."""
    return triton_bias.relative_bias(table, *axes(query_grid), pos, groups=groups, dtype=torch.float32)


def use_backward(monkeypatch, backward: str) -> None:
    """Run the "loop" or the "dots" backward kernel on float32 gradients too (PRECISION "tf32" selects
    the dots kernel; the interpreter computes its products in float32)."""
    monkeypatch.setattr(triton_bias, "BACKWARD", backward)
    monkeypatch.setattr(triton_bias, "PRECISION", "tf32" if backward == "dots" else "ieee")


@in_interpreter
@pytest.mark.parametrize("backward", ["loop", "dots"])
@pytest.mark.parametrize("H, W, Hk, Wk, groups, convention, layout, tile, columns, keys", [
    (4, 4, 4, 4, 2, "released", 0, 16384, 32, 8), (4, 4, 4, 4, 2, "aligned", 1, 16384, 32, 4),
    (5, 7, 3, 4, 1, "released", 0, 512, 2, 4), (3, 6, 6, 5, 3, "released", 1, 512, 4, 8), (5, 5, 5, 5, 1, "aligned", 0, 512, 2, 2)])
def test_kernels_equal_grid_sample(H, W, Hk, Wk, groups, convention, layout, tile, columns, keys, backward, monkeypatch):
    """Values and the gradients of table and positions. Positions reach past the table's edges (zero
    padding); with the aligned grid and Hk x Wk = H x W the first image's keys sit on the queries'
    pixels, so the displacements land on whole table pixels (grid_sample's slope is then towards the
    next one). tile 512 and columns 2 or 4: the kernels take the query columns a few at a time; keys:
    the dots backward's keys per product (2 and 4: several chunks of them, and keys past the last)."""
    use_backward(monkeypatch, backward)
    monkeypatch.setattr(triton_bias, "LAYOUT", layout)
    monkeypatch.setattr(triton_bias, "TILE", tile)
    monkeypatch.setattr(triton_bias, "FORWARD_COLUMNS", columns)
    monkeypatch.setattr(triton_bias, "DOTS_KEYS", keys)
    torch.manual_seed(0)
    M, N = 2 * groups, 2 * groups
    table = torch.randn(M, 2 * H - 1, 2 * W - 1, requires_grad=True)
    query_grid = grid_points(H, W, convention=convention)
    pos = torch.rand(N, Hk, Wk, 2) * 2.4 - 1.2
    if (Hk, Wk) == (H, W):
        pos[0] = query_grid
    pos.requires_grad_()
    upstream = torch.randn(N * M // groups, H * W, Hk * Wk)
    results = (bias_and_gradients(fn, table, query_grid, pos, groups, upstream) for fn in (grid_sample_bias, kernels))
    for name, expected, actual in zip(("bias", "table grad", "position grad"), *results):
        assert_close(actual, expected, name)


@in_interpreter
@pytest.mark.parametrize("backward", ["loop", "dots"])
def test_kernels_write_the_asked_dtype_with_padded_rows(backward, monkeypatch):
    table, pos = torch.randn(4, 7, 7), torch.rand(2, 3, 3, 2) * 2 - 1
    bias = triton_bias.relative_bias(table, *axes(grid_points(4, 4)), pos, groups=2, dtype=torch.bfloat16)
    assert bias.dtype == torch.bfloat16 and bias.shape == (4, 16, 9) and bias.stride() == (256, 16, 1)
    torch.testing.assert_close(bias.float(), grid_sample_bias(table, grid_points(4, 4), pos, 2), atol=2e-2, rtol=1e-2)
    padded = bias.as_strided((4, 16, 16), (256, 16, 1))
    assert not padded[..., 9:].any()  # the row padding is zero, not whatever memory held
    # the backward reads a gradient with padded rows (as SDPA gives it) as it lies
    use_backward(monkeypatch, backward)
    qy, qx = (a.contiguous() for a in axes(grid_points(4, 4)))
    grad = torch.randn(4, 16, 16)[..., :9]
    for by_rows, whole in zip(triton_bias._bias_backward(grad, table, qy, qx, pos, 2),
                              triton_bias._bias_backward(grad.contiguous(), table, qy, qx, pos, 2)):
        torch.testing.assert_close(by_rows, whole, atol=0, rtol=0)


@in_interpreter
@pytest.mark.parametrize("case", ["default", "unbounded", "r2", "aligned", "sdpa", "no_offsets", "other_size", "dots"])
def test_model_with_triton_bias_equals_the_reference(case, monkeypatch):
    """dat_pico with sampler "triton" against the released formulation: logits and all gradients.
    sdpa: the padded bias as SDPA's mask; other_size: 48 x 48 input, tables made for 32 x 32; dots:
    the dots backward (which bf16 training takes; float32 gradients take the loop one)."""
    knobs = {"unbounded": {"offset_range": -1.0}, "r2": {"key_downsample": [1, 1, 2, 1]},
             "aligned": {"reference": "aligned"}, "no_offsets": {"offsets": False}}
    use_backward(monkeypatch, "dots" if case == "dots" else "loop")
    calls = []
    kernels = triton_bias.relative_bias
    monkeypatch.setattr(triton_bias, "relative_bias", lambda *a, **k: calls.append(1) or kernels(*a, **k))
    torch.manual_seed(0)
    model = dat_lab.create_model("dat_pico", **knobs.get(case, {})).eval()
    x = torch.randn(2, 3, *((48, 48) if case == "other_size" else (32, 32)))
    passes = reference_and_fast(model, x, sampler="triton", kernel="sdpa" if case == "sdpa" else "auto")
    assert len(calls) == 2  # the two deformable blocks of dat_pico, in the second pass
    for name, expected in passes[0].items():
        assert_close(passes[1][name], expected, name)


def round_to_tf32(x):
    """float32 numpy array -> its values at tf32's 10 mantissa bits (round to nearest even)."""
    import numpy as np

    bits = x.view(np.uint32).astype(np.uint64)
    return ((bits + 0x0FFF + ((bits >> 13) & 1)) & 0xFFFFE000).astype(np.uint32).view(np.float32)


@in_interpreter
@pytest.mark.parametrize("offset", [0.0, 3.0])
def test_dots_backward_keeps_the_slopes_precise_in_tf32(offset, monkeypatch):
    """With its products in tf32 (emulated: the interpreter rounds the operands of tf32 dots), the dots
    backward's position gradients stay within ~1e-3 of grid_sample's, also for a table far from zero
    (as a trained one may be): it reads slopes from tables of differences made in float32, so the
    rounding is relative to the slopes, not to the table's values (5e-3 when it was)."""
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    if not hasattr(builder, "create_dot") or not hasattr(interpreter, "TensorHandle"):
        pytest.skip("this Triton's interpreter has no create_dot to round")
    dot = builder.create_dot

    def tf32_dot(self, a, b, d, input_precision, *args):
        if getattr(input_precision, "name", "") == "TF32":
            a, b = (interpreter.TensorHandle(round_to_tf32(t.data), t.dtype) for t in (a, b))
        return dot(self, a, b, d, input_precision, *args)

    monkeypatch.setattr(builder, "create_dot", tf32_dot)
    use_backward(monkeypatch, "dots")
    torch.manual_seed(0)
    table = (offset + 0.1 * torch.randn(2, 13, 13)).requires_grad_()
    query_grid = grid_points(7, 7)
    pos = (torch.rand(2, 7, 7, 2) * 2 - 1).requires_grad_()
    upstream = torch.randn(4, 49, 49)
    results = ([*bias_and_gradients(fn, table, query_grid, pos, 1, upstream)][1:] for fn in (grid_sample_bias, kernels))
    for name, expected, actual in zip(("table grad", "position grad"), *results):
        error = ((actual - expected).abs().max() / expected.abs().max()).item()
        assert 1e-5 < error < 1.5e-3, f"{name}: {error:.1e}"  # rounded (the emulation works), and not by much


@in_interpreter
def test_the_backward_kernel_follows_the_gradient_and_the_map(monkeypatch):
    """PRECISION "auto": a bf16 gradient takes the dots kernel (tf32 products) on maps up to 16 x 16,
    a float32 one the loop kernel (float32 products), as do larger maps and BACKWARD "loop"."""
    launched = []
    wrap = torch.library.wrap_triton
    monkeypatch.setattr(torch.library, "wrap_triton", lambda fn: launched.append(fn.fn.__name__) or wrap(fn))

    def backward(size: int, dtype: torch.dtype) -> str:
        launched.clear()
        table, pos = torch.randn(4, 2 * size - 1, 2 * size - 1), torch.rand(2, 2, 2, 2) * 2 - 1
        qy, qx = (a.contiguous() for a in axes(grid_points(size, size)))
        triton_bias._bias_backward(torch.randn(4, size * size, 4).to(dtype), table, qy, qx, pos, 2)
        return launched[-1]

    assert backward(16, torch.bfloat16) == backward(4, torch.float16) == "_backward_dots_kernel"
    assert backward(4, torch.float32) == backward(17, torch.bfloat16) == "_backward_kernel"
    monkeypatch.setattr(triton_bias, "BACKWARD", "loop")
    assert backward(4, torch.bfloat16) == "_backward_kernel"


@outside
def test_kernels_refuse_the_cpu_outside_the_interpreter():
    with pytest.raises(RuntimeError, match="sampler 'triton': the Triton kernels run on CUDA devices, not cpu"):
        triton_bias.relative_bias(torch.randn(2, 7, 7), *axes(grid_points(4, 4)), torch.zeros(2, 3, 3, 2), groups=2,
                                  dtype=torch.float32)


@outside
def test_bad_inputs_are_refused():
    query_axes = axes(grid_points(4, 4))
    with pytest.raises(ValueError, match=r"table of at most 64 x 64 .* this table is \(71, 71\)"):
        triton_bias.relative_bias(torch.randn(2, 71, 71), *query_axes, torch.zeros(2, 3, 3, 2), groups=2, dtype=torch.float32)
    model = dat_lab.create_model("dat_pico", img_size=160, blocks="LD", key_downsample=[4, 2, 1, 1])
    set_deformable_options(model, sampler="triton")
    with pytest.raises(ValueError, match="sampler 'triton': needs Triton"):  # stage 1 at 40 x 40: a 79 x 79 table
        model(torch.randn(1, 3, 160, 160))


@outside
@pytest.mark.parametrize("kernel", ["forward", "backward", "backward_dots"])
def test_kernels_compile_for_an_h100(kernel):
    """The real Triton compiler (not the interpreter) takes the kernels, for sm_90, without a GPU:
    what the interpreter lets pass but the compiler refuses shows here, not on a user's GPU. The dots
    backward's products run on tensor cores (mma instructions)."""
    fn = getattr(triton_bias, f"_{kernel}_kernel")
    pointers = {"table": "*fp32", "qy": "*fp32", "qx": "*fp32", "pos": "*fp32", "out": "*bf16", "grad": "*bf16",
                "table_part": "*fp32", "pos_part": "*fp32", "s_head": "i64"}
    constexprs = {"forward": {"BX": 16, "BK": 32},
                  "backward": {"BX": 8, "BK": 16, "TY": 32, "TX": 32, "PRECISION": "ieee", "LAYOUT": 0},
                  "backward_dots": {"BK": triton_bias.DOTS_KEYS, "BLOCKS": triton_bias.DOTS_BLOCKS, "PY": 16, "PX": 16,
                                    "TY": 32, "TX": 32, "PRECISION": "tf32"}}[kernel]
    compiled = compile_for_h100(fn, pointers, constexprs, warps=4)
    assert ".entry" in compiled.asm["ptx"]
    assert (kernel == "backward_dots") == ("mma." in compiled.asm["ptx"])
