"""DAT's relative position bias for deformed keys as Triton kernels (CUDA): a forward and two backwards.

The plain path reads the (heads, 2H-1, 2W-1) table bilinearly with `grid_sample` at half the
query-key displacement (`DeformableAttention._bias`): it writes the (N, HW, Ns, 2) displacement
grid and a float32 (N*m, HW, Ns) bias, and its backward scatters every point's gradient into the
small table with atomics (one table per image and group: heavy contention on a GPU). These kernels
compute the same bias straight from the query grid and the sampling positions, write it once in
the attention's dtype, and in the backward reduce without atomics (so deterministically), per
(image and group, keys, head), the partial sums added up after. The bilinear weights of a query
and a key split into a row part (query row -> table rows) and a column part (query column -> table
columns), so a key's table gradient is (rows)^T (its gradient map) (columns):
- the "loop" backward (any map the table fits) walks the query rows, a few columns at a time, and
  adds (keys x table rows)^T @ (keys x table columns) products, float32 (or tf32) FMA work;
- the "dots" backward (maps up to 16 x 16 and tables up to 31 x 31: DAT-T's deformable stages)
  takes a whole map at once, every sum over the queries a matrix product on tensor cores (tf32), the
  position gradients too (from tables of the slopes, so that tf32's rounding is relative to them);
  it runs when the incoming gradient is bf16 or fp16 (PRECISION "auto"), where tf32's rounding is
  finer than the gradient's own; float32 (and float64) gradients take the loop one, with float32
  products.

Equal to the grid_sample path to float rounding (tests run these kernels in Triton's interpreter on
the CPU). Tables up to 64 x 64 (maps up to 32 x 32); `supported()` says when they apply. The
settings below (block sizes, warps, which backward) are the fastest `benchmarks/bench_bias.py`
measured on an H100 (session 4) and an H200 (session 6).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton comes with CUDA builds of torch
    triton = None
AVAILABLE = triton is not None and hasattr(torch.library, "triton_op")  # triton_op: torch >= 2.6

MAX_TABLE = 64  # padded table side the backward's (rows x columns) accumulator allows
TILE = 4096  # elements of the backward's (query columns x keys x table columns) weights
WARPS = (4, 4)  # warps per program of the forward and the backward kernel
PRECISION = "auto"  # of the backward's matrix products: "auto" (tf32 for a bf16/fp16 incoming gradient, whose own
# rounding, 2^-9, is coarser than tf32's 2^-11; "ieee", float32, for others), "ieee", "tf32" or "tf32x3"
KEYS = 16  # keys per program of the loop backward
FORWARD_COLUMNS = 32  # query columns per step of the forward
LAYOUT = 0  # of the loop backward's column weights: (columns, keys, table columns) 0 or (keys, table columns, columns) 1
BACKWARD = "dots"  # maps up to DOTS_MAP x DOTS_MAP: "dots" (every sum over queries a matrix product) or "loop"
DOTS_MAP = 16  # the largest map side the dots backward takes (its tiles hold a whole map)
DOTS_KEYS = 4  # keys per matrix-product batch of the dots backward
DOTS_BLOCKS = 8  # key batches per program of the dots backward (the table gradient summed over them in registers)
DOTS_WARPS = 4  # warps per program of the dots backward


def interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter (on the CPU), as TRITON_INTERPRET=1 asks."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def supported(table: Tensor) -> bool:
    """Whether the kernels can read this (heads, Ht, Wt) table (Triton present, table small enough)."""
    return AVAILABLE and max(table.shape[-2:]) <= MAX_TABLE


if AVAILABLE:

    @triton.jit
    def _keys(pos, n, kb, Ns, BK: tl.constexpr):
        """Key indices (BK,) of block kb, whether they exist, and their positions y and x (BK,)."""
        k = kb * BK + tl.arange(0, BK)
        k_in = k < Ns
        p = pos + (n.to(tl.int64) * Ns + k) * 2
        return k, k_in, tl.load(p, mask=k_in, other=0.0), tl.load(p + 1, mask=k_in, other=0.0)

    @triton.jit
    def _axis(q, p, size):
        """Pixel coordinate in a table axis of `size` of half the displacement q - p (as grid_sample
        with align_corners=True unnormalises it); floor (int) and fraction."""
        t = ((q * 0.5 + p * -0.5) + 1) * 0.5 * (size - 1)
        t0 = tl.floor(t)
        return t0.to(tl.int32), t - t0

    @triton.jit
    def _corners(base, y0, x0, Ht, Wt, mask):
        """The table's four values around (y0, x0), zero outside the table: (y0,x0), (y0,x0+1),
        (y0+1,x0), (y0+1,x0+1)."""
        in_y0 = (y0 >= 0) & (y0 < Ht)
        in_y1 = (y0 + 1 >= 0) & (y0 + 1 < Ht)
        in_x0 = (x0 >= 0) & (x0 < Wt)
        in_x1 = (x0 + 1 >= 0) & (x0 + 1 < Wt)
        at = base + y0 * Wt + x0
        v00 = tl.load(at, mask=mask & in_y0 & in_x0, other=0.0)
        v01 = tl.load(at + 1, mask=mask & in_y0 & in_x1, other=0.0)
        v10 = tl.load(at + Wt, mask=mask & in_y1 & in_x0, other=0.0)
        v11 = tl.load(at + Wt + 1, mask=mask & in_y1 & in_x1, other=0.0)
        return v00, v01, v10, v11

    @triton.jit
    def _forward_kernel(table, qy, qx, pos, out, s_head, s_row, G, m, H, W, Ns, Ht, Wt,
                        BX: tl.constexpr, BK: tl.constexpr):
        """Program (n, key block): bias[n*m + h, iy*W + ix, k] for all heads h, queries (iy, ix); zeros
        in the row padding (keys Ns to s_row)."""
        n = tl.program_id(0)
        k, k_in, py, px = _keys(pos, n, tl.program_id(1), Ns, BK)  # (BK,)
        heads = (n % G) * m
        for ix0 in range(0, W, BX):
            ix = ix0 + tl.arange(0, BX)  # (BX,)
            x0, fx = _axis(tl.load(qx + ix, mask=ix < W, other=0.0)[:, None], px[None, :], Wt)  # (BX, BK)
            mask = (ix < W)[:, None] & k_in[None, :]
            store = (ix < W)[:, None] & (k < s_row)[None, :]
            for iy in range(H):
                y0, fy = _axis(tl.load(qy + iy), py, Ht)  # (BK,)
                y0, fy = y0[None, :], fy[None, :]
                row = (iy * W + ix).to(tl.int64)[:, None] * s_row + k[None, :]  # (BX, BK) in one head's (HW, s_row)
                for h in range(m):
                    v00, v01, v10, v11 = _corners(table + (heads + h) * Ht * Wt, y0, x0, Ht, Wt, mask)
                    v = (v00 * (1 - fx) + v01 * fx) * (1 - fy) + (v10 * (1 - fx) + v11 * fx) * fy
                    at = out + (n.to(tl.int64) * m + h) * s_head + row
                    tl.store(at, tl.where(mask, v, 0.0).to(out.dtype.element_ty), mask=store)

    @triton.jit
    def _backward_kernel(table, qy, qx, pos, grad, s_head, s_row, table_part, pos_part, G, m, H, W, Ns, Ht, Wt,
                         BX: tl.constexpr, BK: tl.constexpr, TY: tl.constexpr, TX: tl.constexpr,
                         PRECISION: tl.constexpr, LAYOUT: tl.constexpr):
        """Program (n, key block, head h): the table gradient of its keys into table_part[n, key block, h]
        (TY x TX, padded), and the keys' position gradients through this head into pos_part[n, h]."""
        n = tl.program_id(0)
        kb = tl.program_id(1)
        h = tl.program_id(2)
        k, k_in, py, px = _keys(pos, n, kb, Ns, BK)  # (BK,)
        base = table + ((n % G) * m + h) * Ht * Wt
        grad += (n.to(tl.int64) * m + h) * s_head
        rows = tl.arange(0, TY)[None, :]  # (1, TY)
        d_py = tl.zeros((BK,), dtype=tl.float32)
        d_px = tl.zeros((BK,), dtype=tl.float32)
        acc = tl.zeros((TY, TX), dtype=tl.float32)
        for ix0 in range(0, W, BX):
            ix = ix0 + tl.arange(0, BX)
            x0, fx = _axis(tl.load(qx + ix, mask=ix < W, other=0.0)[:, None], px[None, :], Wt)  # (BX, BK)
            mask = (ix < W)[:, None] & k_in[None, :]
            # column weights: 1 - fx at x0, fx at x0 + 1 (outside the table: dropped at the store), as
            # (BX, BK, TX) summed over axis 0 (LAYOUT 0) or (BK, TX, BX) summed over axis 2 (LAYOUT 1)
            if LAYOUT == 0:
                cols = tl.arange(0, TX)[None, None, :]
                wx = tl.where(cols == x0[:, :, None], 1 - fx[:, :, None], 0.0) + \
                    tl.where(cols == x0[:, :, None] + 1, fx[:, :, None], 0.0)
            else:
                cols = tl.arange(0, TX)[None, :, None]
                x0t, fxt = tl.trans(x0)[:, None, :], tl.trans(fx)[:, None, :]
                wx = tl.where(cols == x0t, 1 - fxt, 0.0) + tl.where(cols == x0t + 1, fxt, 0.0)
            for iy in range(H):
                y0, fy = _axis(tl.load(qy + iy), py, Ht)  # (BK,)
                g = tl.load(grad + (iy * W + ix).to(tl.int64)[:, None] * s_row + k[None, :], mask=mask, other=0.0)
                g = g.to(tl.float32)  # (BX, BK)
                if LAYOUT == 0:
                    per_col = tl.sum(g[:, :, None] * wx, axis=0)  # (BK, TX): summed over query columns
                else:
                    per_col = tl.sum(tl.trans(g)[:, None, :] * wx, axis=2)
                wy = tl.where(rows == y0[:, None], 1 - fy[:, None], 0.0) + \
                    tl.where(rows == y0[:, None] + 1, fy[:, None], 0.0)  # (BK, TY)
                acc += tl.dot(tl.trans(wy), per_col, input_precision=PRECISION)  # (TY, TX)
                v00, v01, v10, v11 = _corners(base, y0[None, :], x0, Ht, Wt, mask)
                fyb = fy[None, :]
                d_py += tl.sum(g * ((v10 - v00) * (1 - fx) + (v11 - v01) * fx), axis=0)
                d_px += tl.sum(g * ((v01 - v00) * (1 - fyb) + (v11 - v10) * fyb), axis=0)
        part = table_part + ((n.to(tl.int64) * tl.num_programs(1) + kb) * m + h) * Ht * Wt
        r, c = tl.arange(0, TY)[:, None], tl.arange(0, TX)[None, :]
        tl.store(part + r * Wt + c, acc, mask=(r < Ht) & (c < Wt))
        # d t / d p = -0.25 (size - 1) on each axis (t = ((q - p) / 2 + 1) / 2 (size - 1))
        q = pos_part + ((n.to(tl.int64) * m + h) * Ns + k) * 2
        tl.store(q, d_py * (-0.25 * (Ht - 1)), mask=k_in)
        tl.store(q + 1, d_px * (-0.25 * (Wt - 1)), mask=k_in)

    @triton.jit
    def _backward_dots_kernel(table, qy, qx, pos, grad, s_head, s_row, table_part, pos_part, G, m, H, W, Ns, Ht, Wt,
                              BK: tl.constexpr, BLOCKS: tl.constexpr, PY: tl.constexpr, PX: tl.constexpr,
                              TY: tl.constexpr, TX: tl.constexpr, PRECISION: tl.constexpr):
        """Program (n, chunk of BLOCKS batches of BK keys, head h), for maps up to PY x PX and tables
        smaller than TY x TX: what _backward_kernel computes, with every sum over the queries as a
        matrix product (tensor cores). Per key, the bilinear weights split into rows wy (query row ->
        table row) and columns wx (query column -> table column), so its table gradient is
        wy^T (grad) wx: first per key over the query columns, (BK, PY, PX) @ (BK, PX, TX), then over
        keys and query rows at once, (TY, BK*PY) @ (BK*PY, TX). The position gradients read the
        table's slopes the same way, from tables of differences made in float32 (so that the
        products' tf32 rounding is relative to the slopes, not to the table's values): d bias / d ty
        is the row difference at y0 summed over columns with wx, d bias / d tx the column difference
        at x0 summed over rows with wy."""
        n = tl.program_id(0)
        chunk = tl.program_id(1)
        h = tl.program_id(2)
        grad += (n.to(tl.int64) * m + h) * s_head
        r, c = tl.arange(0, TY)[:, None], tl.arange(0, TX)[None, :]
        base = table + ((n % G) * m + h) * Ht * Wt + r * Wt + c  # (TY, TX) pointers; zero outside the table
        here = tl.load(base, mask=(r < Ht) & (c < Wt), other=0.0)
        dy = here - tl.load(base - Wt, mask=(r >= 1) & (r <= Ht) & (c < Wt), other=0.0)  # row r: t[r] - t[r - 1]
        dx = here - tl.load(base - 1, mask=(r < Ht) & (c >= 1) & (c <= Wt), other=0.0)  # column c: t[:, c] - t[:, c - 1]
        iy, ix = tl.arange(0, PY), tl.arange(0, PX)
        qyv = tl.load(qy + iy, mask=iy < H, other=0.0)[None, :]  # (1, PY)
        qxv = tl.load(qx + ix, mask=ix < W, other=0.0)[None, :]  # (1, PX)
        at = (iy[None, :, None] * W + ix[None, None, :]).to(tl.int64) * s_row  # (1, PY, PX): query rows of grad
        in_map = (iy < H)[None, :, None] & (ix < W)[None, None, :]
        rows, cols = tl.arange(0, TY)[None, None, :], tl.arange(0, TX)[None, None, :]
        acc = tl.zeros((TY, TX), dtype=tl.float32)
        for b in range(BLOCKS):
            k, k_in, py, px = _keys(pos, n, chunk * BLOCKS + b, Ns, BK)  # (BK,)
            g = tl.load(grad + at + k[:, None, None], mask=in_map & k_in[:, None, None], other=0.0)
            g = g.to(tl.float32)  # (BK, PY, PX)
            x0, fx = _axis(qxv, px[:, None], Wt)  # (BK, PX)
            x0, fx = x0[:, :, None], fx[:, :, None]
            wx = tl.where(cols == x0, 1 - fx, 0.0) + tl.where(cols == x0 + 1, fx, 0.0)  # (BK, PX, TX)
            by_col = tl.reshape(tl.dot(g, wx, input_precision=PRECISION), (BK * PY, TX))
            at_dx = tl.reshape(tl.dot(g, (cols == x0 + 1).to(tl.float32), input_precision=PRECISION), (BK * PY, TX))
            y0, fy = _axis(qyv, py[:, None], Ht)  # (BK, PY)
            y0, fy = y0[:, :, None], fy[:, :, None]
            wy = tl.reshape(tl.where(rows == y0, 1 - fy, 0.0) + tl.where(rows == y0 + 1, fy, 0.0), (BK * PY, TY))
            at_dy = tl.reshape((rows == y0 + 1).to(tl.float32), (BK * PY, TY))
            acc += tl.dot(tl.trans(wy), by_col, input_precision=PRECISION)  # (TY, TX)
            d_py = tl.sum(by_col * tl.dot(at_dy, dy, input_precision=PRECISION), axis=1)  # (BK*PY,)
            d_px = tl.sum(at_dx * tl.dot(wy, dx, input_precision=PRECISION), axis=1)
            q = pos_part + ((n.to(tl.int64) * m + h) * Ns + k) * 2
            tl.store(q, tl.sum(tl.reshape(d_py, (BK, PY)), axis=1) * (-0.25 * (Ht - 1)), mask=k_in)
            tl.store(q + 1, tl.sum(tl.reshape(d_px, (BK, PY)), axis=1) * (-0.25 * (Wt - 1)), mask=k_in)
        part = table_part + ((n.to(tl.int64) * tl.num_programs(1) + chunk) * m + h) * Ht * Wt
        tl.store(part + r * Wt + c, acc, mask=(r < Ht) & (c < Wt))


def _blocks(W: int, Ns: int, table_cols: int) -> tuple[int, int, int]:
    """(query columns per step BX, keys per program BK, padded table columns TX) for the backward."""
    TX = max(16, triton.next_power_of_2(table_cols))
    BK = max(16, min(KEYS, triton.next_power_of_2(Ns)))
    return max(2, min(triton.next_power_of_2(W), TILE // (BK * TX))), BK, TX


def sizes(table: Tensor, qy: Tensor, qx: Tensor, pos: Tensor, groups: int) -> tuple[int, ...]:
    """(M heads, Ht, Wt, N images x groups, Ns keys, H, W query grid, m heads per group)."""
    M, Ht, Wt = table.shape
    return M, Ht, Wt, pos.shape[0], pos.shape[1] * pos.shape[2], qy.numel(), qx.numel(), M // groups


def check_operands(table: Tensor, query_y: Tensor, query_x: Tensor, positions: Tensor, groups: int) -> None:
    """A one-line ValueError unless the shapes are those `relative_bias` takes (here and in cpu_kernels)."""
    if table.dim() != 3 or positions.dim() != 4 or positions.shape[-1] != 2 or query_y.dim() != 1 or query_x.dim() != 1:
        raise ValueError(f"relative_bias: table (heads, Ht, Wt), query_y (H,), query_x (W,) and positions "
                         f"(N, Hk, Wk, 2) expected; got {tuple(table.shape)}, {tuple(query_y.shape)}, "
                         f"{tuple(query_x.shape)}, {tuple(positions.shape)}")
    if table.shape[0] % groups or positions.shape[0] % groups:
        raise ValueError(f"relative_bias: groups {groups} must divide the table's heads ({table.shape[0]}) and "
                         f"the positions' first dimension ({positions.shape[0]})")


def operands(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The inputs as the kernels index them: float32, contiguous (no copy when they already are)."""
    return tuple(t.float().contiguous() for t in tensors)


def _bias_forward(table: Tensor, qy: Tensor, qx: Tensor, pos: Tensor, groups: int, dtype: torch.dtype) -> Tensor:
    """The bias (N*m, H*W, Ns) in `dtype`, a view of rows padded to 16 elements: the alignment SDPA's
    memory-efficient kernel asks of a mask (it would copy the mask into such a buffer otherwise)."""
    M, Ht, Wt, N, Ns, H, W, m = sizes(table, qy, qx, pos, groups)
    out = torch.empty(N * m, H * W, -(-Ns // 16) * 16, device=pos.device, dtype=dtype)  # padding zeroed by the kernel
    BK = 32 if Ns > 16 else 16  # a multiple of 16: the programs cover the padding
    kernel = torch.library.wrap_triton(_forward_kernel)
    kernel[(N, triton.cdiv(Ns, BK))](*operands(table, qy, qx, pos), out, out.stride(0), out.stride(1), groups, m,
                                     H, W, Ns, Ht, Wt, BX=min(triton.next_power_of_2(W), FORWARD_COLUMNS), BK=BK,
                                     num_warps=WARPS[0])
    return out[..., :Ns]


def _bias_backward(grad: Tensor, table: Tensor, qy: Tensor, qx: Tensor, pos: Tensor,
                   groups: int) -> tuple[Tensor, Tensor]:
    """Gradients of the table (M, Ht, Wt) and the positions (N, Hk, Wk, 2) from the bias's (N*m, HW, Ns)."""
    M, Ht, Wt, N, Ns, H, W, m = sizes(table, qy, qx, pos, groups)
    half = grad.dtype in (torch.bfloat16, torch.float16)
    precision = PRECISION if PRECISION != "auto" else "tf32" if half else "ieee"
    # the dots backward only with tensor cores: float32 ("ieee") products there spill registers by
    # kilobytes; its tables of differences need a row and a column beyond the table
    if BACKWARD == "dots" and precision != "ieee" and max(H, W) <= DOTS_MAP and max(Ht, Wt) < 2 * DOTS_MAP:
        # programs (n, chunk of DOTS_BLOCKS batches of DOTS_KEYS keys, head)
        TY, TX = (max(16, triton.next_power_of_2(size + 1)) for size in (Ht, Wt))
        chunks = triton.cdiv(Ns, DOTS_KEYS * DOTS_BLOCKS)
        kernel, constants = _backward_dots_kernel, dict(BK=DOTS_KEYS, BLOCKS=DOTS_BLOCKS, PY=DOTS_MAP, PX=DOTS_MAP,
                                                         num_warps=DOTS_WARPS)
    else:  # programs (n, block of keys, head)
        BX, BK, TX = _blocks(W, Ns, Wt)
        TY, chunks = max(16, triton.next_power_of_2(Ht)), triton.cdiv(Ns, BK)
        kernel, constants = _backward_kernel, dict(BX=BX, BK=BK, LAYOUT=LAYOUT, num_warps=WARPS[1])
    part = torch.empty(N, chunks, m, Ht, Wt, device=pos.device, dtype=torch.float32)  # per program
    pos_part = torch.empty(N, m, *pos.shape[1:], device=pos.device, dtype=torch.float32)  # per head
    grad = grad if grad.stride(-1) == 1 else grad.contiguous()
    torch.library.wrap_triton(kernel)[(N, chunks, m)](
        *operands(table, qy, qx, pos), grad, grad.stride(0), grad.stride(1), part, pos_part, groups, m, H, W, Ns, Ht,
        Wt, TY=TY, TX=TX, PRECISION=precision, **constants)
    table_grad = part.reshape(N // groups, groups, chunks, m, Ht, Wt).sum((0, 2)).reshape(M, Ht, Wt)
    return table_grad.to(table.dtype), pos_part.sum(1).to(pos.dtype)


if AVAILABLE:  # as custom ops, so that torch.compile traces through them
    _bias_forward = torch.library.triton_op(
        "dat_lab::relative_bias", _bias_forward, mutates_args=(),
        schema="(Tensor table, Tensor qy, Tensor qx, Tensor pos, int groups, ScalarType dtype) -> Tensor")
    _bias_backward = torch.library.triton_op(
        "dat_lab::relative_bias_backward", _bias_backward, mutates_args=(),
        schema="(Tensor grad, Tensor table, Tensor qy, Tensor qx, Tensor pos, int groups) -> (Tensor, Tensor)")

    def _save(ctx, inputs: tuple, output: Tensor) -> None:
        """Keep table, query axes and positions for the backward."""
        table, qy, qx, pos, ctx.groups, _ = inputs
        ctx.save_for_backward(table, qy, qx, pos)

    def _backward(ctx, grad: Tensor) -> tuple:
        """Gradients of table and positions (the axes, groups and dtype have none)."""
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[3]):
            return None, None, None, None, None, None
        table_grad, pos_grad = _bias_backward(grad, *ctx.saved_tensors, ctx.groups)
        return table_grad, None, None, pos_grad, None, None

    torch.library.register_autograd("dat_lab::relative_bias", _backward, setup_context=_save)


def relative_bias(table: Tensor, query_y: Tensor, query_x: Tensor, positions: Tensor, *, groups: int,
                  dtype: torch.dtype) -> Tensor:
    """The (heads, Ht, Wt) table read bilinearly at half of query - key for every query of the H x W
    grid with coordinates query_y (H,) and query_x (W,) (float32) and every key at positions
    (N, Hk, Wk, 2) (N = images x groups; (y, x), normalised): (N * heads/groups, H*W, Hk*Wk) in
    `dtype`, as grid_sample(align_corners=True) gives."""
    if not supported(table):
        raise ValueError(f"sampler 'triton': needs Triton and torch >= 2.6, and a table of at most {MAX_TABLE} x "
                         f"{MAX_TABLE} (maps up to {(MAX_TABLE + 1) // 2} x {(MAX_TABLE + 1) // 2}); this table is "
                         f"{tuple(table.shape[-2:])}: use sampler 'auto' or 'grid_sample'")
    if not positions.is_cuda and not interpreted():
        raise RuntimeError(f"sampler 'triton': the Triton kernels run on CUDA devices, not {positions.device.type} "
                           "(or in Triton's interpreter: TRITON_INTERPRET=1); use sampler 'auto' or 'grid_sample'")
    check_operands(table, query_y, query_x, positions, groups)
    return _bias_forward(table, query_y, query_x, positions, groups, dtype)
