"""The fused attention kernels of `triton_attention` (kernel "triton", CUDA), checked on the CPU in
Triton's interpreter against the plain path (grid_sample's bias, softmax, matrix products) in values
and the gradients of q, k, v, table and positions, and inside the model against the reference. As in
test_triton_bias.py, `test_kernels_in_the_interpreter` runs this file again with TRITON_INTERPRET=1.
"""

import os
import subprocess
from pathlib import Path

import pytest
import torch

import dat_lab
from dat_lab.models import triton_attention
from dat_lab.models.attention import set_deformable_options
from dat_lab.models.geometry import grid_points

from bias_reference import (assert_close, axes, compile_for_h100, grid_sample_bias, in_interpreter, outside,
                            reference_and_fast, run_in_interpreter, skip_without_triton_op)

skip_without_triton_op()


@outside
def test_kernels_in_the_interpreter():
    run_in_interpreter(__file__, outside=6)


def operands(B, G, m, D, H, W, Hk, Wk, dtype, token_major=True, reach=1.2):
    """q (B, M, HW, D), k and v (B, M, Ns, D) (views of token-major tensors, k's with room for v
    beside it as a projection to both gives; or contiguous), a table, the query grid and positions
    in [-reach, reach] (past 1: past the table's edges, past 3: both corners outside): all needing
    gradients."""
    M, HW, Ns = G * m, H * W, Hk * Wk
    if token_major:
        q = torch.randn(B, HW, M, D).transpose(1, 2)
        kv = torch.randn(B, Ns, 2, M, D)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    else:
        q, k, v = torch.randn(B, M, HW, D), torch.randn(B, M, Ns, D), torch.randn(B, M, Ns, D)
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    table = torch.randn(M, 2 * H - 1, 2 * W - 1, requires_grad=True)
    pos = ((torch.rand(B * G, Hk, Wk, 2) * 2 - 1) * reach).requires_grad_()
    return q, k, v, table, grid_points(H, W), pos


def plain(q, k, v, table, query_grid, pos, groups, scale):
    """softmax(q k^T scale + bias) v with grid_sample's bias, in float32."""
    B, M, HW, _ = q.shape
    bias = grid_sample_bias(table, query_grid, pos, groups).view(B, M, HW, -1)
    return ((q.float() @ k.float().transpose(-1, -2)) * scale + bias).softmax(-1) @ v.float()


def fused(q, k, v, table, query_grid, pos, groups, scale):
    return triton_attention.deformable_attention(q, k, v, table, *axes(query_grid), pos, groups=groups, scale=scale)


@in_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # bf16: the interpreter's dots are wrong
@pytest.mark.parametrize("B, G, m, D, H, W, Hk, Wk, token_major, blocks, reach", [
    (2, 2, 2, 16, 5, 7, 4, 5, True, (16, 16, 4), 1.2), (1, 3, 1, 32, 4, 4, 4, 4, False, (16, 16, 2), 1.2),
    (2, 1, 2, 16, 6, 6, 3, 3, True, (32, 16, 4), 1.2), (1, 2, 1, 16, 3, 9, 5, 7, True, (16, 32, 4), 1.2),
    (1, 2, 1, 16, 4, 5, 4, 4, True, (16, 16, 4), 6.0)])
def test_kernels_equal_the_plain_path(B, G, m, D, H, W, Hk, Wk, token_major, blocks, reach, dtype, monkeypatch):
    """Output and the gradients of q, k, v, table and positions; tiles of 16 and 32 over 16 to 54
    queries and 9 to 35 keys (several tiles, and the last one partly past the end); the q, k, v views
    the model gives (token-major) and contiguous ones; keys far outside the map (unbounded offsets:
    displacements past the table's zero border); in float16 within its rounding."""
    monkeypatch.setattr(triton_attention, "FORWARD", blocks)
    monkeypatch.setattr(triton_attention, "BACKWARD", (blocks[1], blocks[0], blocks[2]))  # tiles the other way
    torch.manual_seed(0)
    inputs = operands(B, G, m, D, H, W, Hk, Wk, dtype, token_major, reach)
    upstream = torch.randn(B, G * m, H * W, D)
    scale = D ** -0.5
    results = []
    for attend in (plain, fused):
        out = attend(*inputs, G, scale)
        differentiable = [t for t in inputs if t.requires_grad]
        results.append([out, *torch.autograd.grad(out, differentiable, upstream.to(out.dtype))])
    assert results[1][0].dtype == dtype
    for name, expected, actual in zip(("out", "q", "k", "v", "table", "positions"), *results):
        if dtype == torch.float32:
            assert_close(actual, expected, name)
        else:
            error = ((actual.float() - expected).abs().max() / expected.abs().max()).item()
            assert error < 3e-3, f"{name}: {error:.1e}"


def count_calls(monkeypatch) -> list:
    """A list that grows by one at each call of the fused kernels' entry point."""
    calls = []
    kernel = triton_attention.deformable_attention
    monkeypatch.setattr(triton_attention, "deformable_attention", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    return calls


@in_interpreter
@pytest.mark.parametrize("case", ["default", "unbounded", "r2", "no_offsets", "other_size", "fixed", "head_size_24"])
def test_model_with_the_fused_attention_equals_the_reference(case, monkeypatch):
    """dat_pico with kernel "triton" against the released formulation: logits and all gradients. fixed
    (a learned bias per query and key, not the relative table) and dat_nano (heads of 24 channels, not a
    power of two) take SDPA instead."""
    knobs = {"unbounded": {"offset_range": -1.0}, "r2": {"key_downsample": [1, 1, 2, 1]},
             "no_offsets": {"offsets": False}, "fixed": {"position": "fixed"}}
    calls = count_calls(monkeypatch)
    torch.manual_seed(0)
    model = dat_lab.create_model("dat_nano" if case == "head_size_24" else "dat_pico", **knobs.get(case, {})).eval()
    x = torch.randn(2, 3, *((48, 48) if case == "other_size" else (32, 32)))
    passes = reference_and_fast(model, x, kernel="triton")
    assert len(calls) == (0 if case in ("fixed", "head_size_24") else 2)  # dat_pico's two deformable blocks
    for name, expected in passes[0].items():
        assert_close(passes[1][name], expected, name)


@in_interpreter
@pytest.mark.parametrize("attn_drop, training, fused_calls", [(0.1, True, 0), (0.1, False, 2), (0.0, True, 2)])
def test_attention_dropout_in_training_takes_sdpa(attn_drop, training, fused_calls, monkeypatch):
    calls = count_calls(monkeypatch)
    model = set_deformable_options(dat_lab.create_model("dat_pico", attn_drop_rate=attn_drop), kernel="triton")
    model.train(training)(torch.randn(2, 3, 32, 32)).sum().backward()
    assert len(calls) == fused_calls


@outside
def test_bad_inputs_are_refused():
    q, k, v, table, query_grid, pos = operands(1, 2, 1, 16, 4, 4, 3, 3, torch.float32)
    with pytest.raises(RuntimeError, match="kernel 'triton': the Triton kernels run on CUDA devices, not cpu"):
        fused(q, k, v, table, query_grid, pos, 2, 0.25)
    q, k, v, table, query_grid, pos = operands(1, 2, 1, 24, 4, 4, 3, 3, torch.float32)
    with pytest.raises(ValueError, match="head size that is a power of two from 16 to 128; got table .7, 7., head "
                                         "size 24: use kernel 'auto' or 'sdpa'"):
        fused(q, k, v, table, query_grid, pos, 2, 0.25)


@outside
@pytest.mark.parametrize("head_size", [32, 64])
@pytest.mark.parametrize("kernel", ["forward", "backward"])
def test_kernels_compile_for_an_h100_without_spilling(kernel, head_size, tmp_path):
    """The real Triton compiler takes both kernels with the shipped tiles for sm_90 (bf16; head size 32 as
    in DAT-T, -S and -B, and 64), their products on tensor cores, and (where Triton ships ptxas) no
    register spills."""
    fn = getattr(triton_attention, f"_{kernel}_kernel")
    BM, BN, warps = getattr(triton_attention, kernel.upper())
    pointers = {name: "*bf16" for name in ("q", "k", "v", "out", "grad", "dk", "dv", "ds")}
    pointers |= {name: "*fp32" for name in ("table", "qy", "qx", "pos", "lse", "delta")} | {"scale": "fp32"}
    compiled = compile_for_h100(fn, pointers, {"D": head_size, "BM": BM, "BN": BN, "PRECISION": "tf32"}, warps)
    assert "mma." in compiled.asm["ptx"]
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("this Triton ships no ptxas")
    (tmp_path / "kernel.ptx").write_text(compiled.asm["ptx"])
    report = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(tmp_path / "kernel.ptx"), "-o", os.devnull],
                            capture_output=True, text=True)
    assert report.returncode == 0, report.stderr[-2000:]
    assert "Used " in report.stderr and " 0 bytes spill stores" in report.stderr, report.stderr[-2000:]
