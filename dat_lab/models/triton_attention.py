"""DAT's deformable attention with its relative position bias in one Triton kernel (CUDA; opt-in,
`kernel="triton"`).

`scaled_dot_product_attention` with the bias as its mask needs the (B*M, HW, Ns) bias written first
(`triton_bias`'s forward) and reads it back; here each tile of logits adds the bias it needs, read
bilinearly from the small (heads, 2H-1, 2W-1) table at half of query - key (`triton_bias._axis`; the
table with a border of zeros, so that no read is masked), with an online softmax over the keys (flash attention), so the bias is never written.
The backward, per block of keys, walks the queries once: recomputes logits and probabilities from
the saved log-sum-exp, accumulates the keys' and values' gradients, and writes the logits' gradient
(= the bias's), which the queries' gradient (one batched matrix product) and `triton_bias`'s backward
(table and positions, no atomics) read. Deterministic. Equal to the plain path to float rounding
(tests run the kernels in Triton's interpreter on the CPU); not yet timed on a GPU, hence not the
default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import triton_bias

if triton_bias.AVAILABLE:
    import triton
    import triton.language as tl

    from .triton_bias import _axis, _keys

# (queries per tile, keys per tile, warps per program), compiled for sm_90 with bf16 operands: tiles that
# take no spilled registers at head sizes 32 and 64 (ptxas: 230 and 227 registers forward, 168 and 182
# backward; 64 x 64 spilled), the forward's two products in one warp layout (with 8 warps its 64 rows
# took two layouts and a conversion between them each step). Not timed yet
FORWARD = (64, 32, 4)
BACKWARD = (32, 64, 8)


def supported(table: Tensor, q: Tensor) -> bool:
    """Whether the kernels take this table and head size (a power of two from 16 to 128)."""
    hc = q.shape[-1]
    return triton_bias.supported(table) and 16 <= hc <= 128 and hc & (hc - 1) == 0


if triton_bias.AVAILABLE:

    @triton.jit
    def _tile_bias(base, qyv, qxv, py, px, Ht, Wt):
        """The bias of queries at (qyv, qxv) (BM,) and keys at (py, px) (BN,): (BM, BN) float32, read
        from the head's table with a border of two zeros at base (see `_bordered`): a corner index
        clamped to [-2, Ht] (or Wt) reads zeros where it is outside the table, so no read is masked."""
        y0, fy = _axis(qyv[:, None], py[None, :], Ht)
        x0, fx = _axis(qxv[:, None], px[None, :], Wt)
        at = base + (tl.minimum(tl.maximum(y0, -2), Ht) + 2) * (Wt + 4) + tl.minimum(tl.maximum(x0, -2), Wt) + 2
        top = tl.load(at) * (1 - fx) + tl.load(at + 1) * fx
        bottom = tl.load(at + Wt + 4) * (1 - fx) + tl.load(at + Wt + 5) * fx
        return top * (1 - fy) + bottom * fy

    @triton.jit
    def _head(M, G):
        """This program's image b and head h, and n, the index of their image and group in the positions."""
        bh = tl.program_id(0)
        b, h = bh // M, bh % M
        return b, h, b * G + h // (M // G)

    @triton.jit
    def _rows(base, b, h, rows, s_b, s_h, s_n, D: tl.constexpr):
        """Pointers (R, D) to the rows (R,) of image b, head h in a (B, M, tokens, D) tensor at base with
        those strides (its last axis contiguous); offsets for a base of 0."""
        return base + b.to(tl.int64) * s_b + h * s_h + rows[:, None].to(tl.int64) * s_n + tl.arange(0, D)[None, :]

    @triton.jit
    def _queries(qy, qx, qb, HW, W, BM: tl.constexpr):
        """Query indices (BM,) of block qb, whether they exist, and their coordinates y and x (BM,)."""
        i = qb * BM + tl.arange(0, BM)
        i_in = i < HW
        return i, i_in, tl.load(qy + i // W, mask=i_in, other=0.0), tl.load(qx + i % W, mask=i_in, other=0.0)

    @triton.jit
    def _forward_kernel(q, k, v, table, qy, qx, pos, out, lse, s_qb, s_qh, s_qn, s_kb, s_kh, s_kn,
                        s_vb, s_vh, s_vn, s_ob, s_oh, s_on, scale, M, G, HW, W, Ns, Ht, Wt,
                        D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PRECISION: tl.constexpr):
        """Program (image and head, query block): out (BM, D) and the rows' log-sum-exp."""
        b, h, n = _head(M, G)
        i, i_in, qyv, qxv = _queries(qy, qx, tl.program_id(1), HW, W, BM)
        qt = tl.load(_rows(q, b, h, i, s_qb, s_qh, s_qn, D), mask=i_in[:, None], other=0.0)  # (BM, D)
        base = table + h * (Ht + 4) * (Wt + 4)
        row_max = tl.full((BM,), float("-inf"), tl.float32)
        row_sum = tl.zeros((BM,), tl.float32)
        acc = tl.zeros((BM, D), tl.float32)
        for kb in range(0, tl.cdiv(Ns, BN)):
            kk, k_in, py, px = _keys(pos, n, kb, Ns, BN)  # (BN,)
            kt = tl.load(_rows(k, b, h, kk, s_kb, s_kh, s_kn, D), mask=k_in[:, None], other=0.0)  # (BN, D)
            vt = tl.load(_rows(v, b, h, kk, s_vb, s_vh, s_vn, D), mask=k_in[:, None], other=0.0)
            s = tl.dot(qt, tl.trans(kt), input_precision=PRECISION) * scale \
                + _tile_bias(base, qyv, qxv, py, px, Ht, Wt)  # (BM, BN) logits
            s = tl.where(k_in[None, :], s, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(s, axis=1))
            alpha = tl.exp(row_max - new_max)
            p = tl.exp(s - new_max[:, None])
            row_sum = row_sum * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION)
            row_max = new_max
        at = _rows(out, b, h, i, s_ob, s_oh, s_on, D)
        tl.store(at, (acc / row_sum[:, None]).to(out.dtype.element_ty), mask=i_in[:, None])
        tl.store(lse + tl.program_id(0).to(tl.int64) * HW + i, row_max + tl.log(row_sum), mask=i_in)

    @triton.jit
    def _backward_kernel(q, k, v, grad, table, qy, qx, pos, lse, delta, dk, dv, ds, s_qb, s_qh, s_qn,
                         s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_gb, s_gh, s_gn, s_db, s_dh, s_dn, s_ds, s_dr,
                         scale, M, G, HW, W, Ns,
                         Ht, Wt, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PRECISION: tl.constexpr):
        """Program (image and head, key block): the keys' and values' gradients (BN, D) (dk and dv
        with the strides s_d*), and the logits' gradient of every query with these keys into ds."""
        b, h, n = _head(M, G)
        bh = tl.program_id(0)  # the row of lse, delta and ds
        kk, k_in, py, px = _keys(pos, n, tl.program_id(1), Ns, BN)
        kt = tl.load(_rows(k, b, h, kk, s_kb, s_kh, s_kn, D), mask=k_in[:, None], other=0.0)  # (BN, D)
        vt = tl.load(_rows(v, b, h, kk, s_vb, s_vh, s_vn, D), mask=k_in[:, None], other=0.0)
        base = table + h * (Ht + 4) * (Wt + 4)
        dk_acc = tl.zeros((BN, D), tl.float32)
        dv_acc = tl.zeros((BN, D), tl.float32)
        for qb in range(0, tl.cdiv(HW, BM)):
            i, i_in, qyv, qxv = _queries(qy, qx, qb, HW, W, BM)
            qt = tl.load(_rows(q, b, h, i, s_qb, s_qh, s_qn, D), mask=i_in[:, None], other=0.0)  # (BM, D)
            gt = tl.load(_rows(grad, b, h, i, s_gb, s_gh, s_gn, D), mask=i_in[:, None], other=0.0)
            row_lse = tl.load(lse + bh.to(tl.int64) * HW + i, mask=i_in, other=0.0)
            row_delta = tl.load(delta + bh.to(tl.int64) * HW + i, mask=i_in, other=0.0)
            mask = i_in[:, None] & k_in[None, :]
            s = tl.dot(qt, tl.trans(kt), input_precision=PRECISION) * scale \
                + _tile_bias(base, qyv, qxv, py, px, Ht, Wt)
            p = tl.where(mask, tl.exp(s - row_lse[:, None]), 0.0)  # (BM, BN) probabilities
            dv_acc += tl.dot(tl.trans(p.to(gt.dtype)), gt, input_precision=PRECISION)
            dp = tl.dot(gt, tl.trans(vt), input_precision=PRECISION)
            dst = p * (dp - row_delta[:, None])  # (BM, BN) the logits' gradient
            tl.store(ds + bh.to(tl.int64) * s_ds + i[:, None].to(tl.int64) * s_dr + kk[None, :],
                     dst.to(ds.dtype.element_ty), mask=mask)
            dk_acc += tl.dot(tl.trans(dst.to(qt.dtype)), qt, input_precision=PRECISION)
        at = _rows(0, b, h, kk, s_db, s_dh, s_dn, D)  # offsets: dk and dv lie alike
        tl.store(dk + at, (dk_acc * scale).to(dk.dtype.element_ty), mask=k_in[:, None])
        tl.store(dv + at, dv_acc.to(dv.dtype.element_ty), mask=k_in[:, None])


def _bordered(table: Tensor) -> Tensor:
    """The (M, Ht, Wt) table in float32 with a border of two zeros: (M, Ht+4, Wt+4)."""
    return F.pad(table.float(), (2, 2, 2, 2))


def _precision(q: Tensor) -> str:
    """Float32 operands keep float32 products (the plain path's); bf16 and fp16 take the tensor cores'."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _strides(*tensors: Tensor) -> list[int]:
    """The (image, head, token) strides of (B, M, tokens, D) views whose last axis is contiguous."""
    return [s for t in tensors for s in t.stride()[:3]]


def _dense_last(t: Tensor) -> Tensor:
    """t with a contiguous last axis (the kernels' loads assume it): no copy when it has one."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _attention_forward(q: Tensor, k: Tensor, v: Tensor, table: Tensor, qy: Tensor, qx: Tensor, pos: Tensor,
                       groups: int, scale: float) -> tuple[Tensor, Tensor]:
    """out (B, M, HW, D), a view of a token-major (B, HW, M, D) buffer as SDPA gives it, and the
    rows' log-sum-exp (B*M, HW) float32."""
    q, k, v = (_dense_last(t) for t in (q, k, v))
    B, M, HW, D = q.shape
    Ns, (Ht, Wt), W = k.shape[2], table.shape[-2:], qx.numel()
    out = torch.empty(B, HW, M, D, device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty(B * M, HW, device=q.device, dtype=torch.float32)
    BM, BN, warps = FORWARD
    kernel = torch.library.wrap_triton(_forward_kernel)
    kernel[(B * M, triton.cdiv(HW, BM))](
        q, k, v, _bordered(table), *triton_bias.operands(qy, qx, pos), out, lse, *_strides(q, k, v, out), scale, M, groups,
        HW, W, Ns, Ht, Wt, D=D, BM=BM, BN=BN, PRECISION=_precision(q), num_warps=warps)
    return out, lse


def _attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, table: Tensor,
                        qy: Tensor, qx: Tensor, pos: Tensor, groups: int,
                        scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of q, k, v (B, M, tokens, D), the table (M, Ht, Wt) and the positions (N, Hk, Wk, 2)."""
    grad, q, k, v = (_dense_last(t) for t in (grad, q, k, v))
    B, M, HW, D = q.shape
    Ns, (Ht, Wt), W = k.shape[2], table.shape[-2:], qx.numel()
    delta = (grad.float() * out.float()).sum(-1).reshape(B * M, HW)  # rowsum(dO * O): (B*M, HW)
    dk, dv = (torch.empty(B, Ns, M, D, device=q.device, dtype=t.dtype).transpose(1, 2) for t in (k, v))  # token-major
    # the logits' gradient, rows padded to 16 elements as triton_bias writes the bias (aligned loads)
    ds = torch.empty(B * M, HW, -(-Ns // 16) * 16, device=q.device, dtype=q.dtype)[..., :Ns]
    BM, BN, warps = BACKWARD
    kernel = torch.library.wrap_triton(_backward_kernel)
    kernel[(B * M, triton.cdiv(Ns, BN))](
        q, k, v, grad, _bordered(table), *triton_bias.operands(qy, qx, pos), lse, delta, dk, dv, ds, *_strides(q, k, v, grad, dk),
        ds.stride(0), ds.stride(1), scale, M, groups, HW, W, Ns, Ht, Wt, D=D, BM=BM, BN=BN,
        PRECISION=_precision(q), num_warps=warps)
    dq = (ds.view(B, M, HW, Ns) @ k) * scale  # (B, M, HW, D): one batched product, deterministic
    table_grad, pos_grad = triton_bias._bias_backward(ds, table, qy, qx, pos, groups)
    return dq, dk, dv, table_grad, pos_grad


if triton_bias.AVAILABLE:  # custom ops, so that torch.compile traces through them
    _attention_forward = torch.library.triton_op(
        "dat_lab::deformable_attention", _attention_forward, mutates_args=(),
        schema="(Tensor q, Tensor k, Tensor v, Tensor table, Tensor qy, Tensor qx, Tensor pos, int groups, "
               "float scale) -> (Tensor, Tensor)")
    _attention_backward = torch.library.triton_op(
        "dat_lab::deformable_attention_backward", _attention_backward, mutates_args=(),
        schema="(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor table, Tensor qy, "
               "Tensor qx, Tensor pos, int groups, float scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")

    def _save(ctx, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
        """Keep the operands, the output and its log-sum-exp for the backward."""
        q, k, v, table, qy, qx, pos, ctx.groups, ctx.scale = inputs
        ctx.save_for_backward(q, k, v, *output, table, qy, qx, pos)

    def _backward(ctx, grad: Tensor, _lse_grad: Tensor | None) -> tuple:
        """Gradients of q, k, v, table and positions (the axes, groups and scale have none)."""
        q, k, v, out, lse, table, qy, qx, pos = ctx.saved_tensors
        dq, dk, dv, table_grad, pos_grad = _attention_backward(grad, q, k, v, out, lse, table, qy, qx, pos,
                                                               ctx.groups, ctx.scale)
        return dq, dk, dv, table_grad, None, None, pos_grad, None, None

    torch.library.register_autograd("dat_lab::deformable_attention", _backward, setup_context=_save)


def deformable_attention(q: Tensor, k: Tensor, v: Tensor, table: Tensor, query_y: Tensor, query_x: Tensor,
                         positions: Tensor, *, groups: int, scale: float) -> Tensor:
    """softmax(q k^T * scale + bias) v per image and head, the bias the (heads, Ht, Wt) table read
    bilinearly at half of query - key as `triton_bias.relative_bias` gives it: q (B, M, HW, D), k and v
    (B, M, Ns, D) (views with a contiguous last axis; token-major as the model makes them), queries
    on the H x W grid of coordinates query_y (H,), query_x (W,), keys at positions (B*groups, Hk, Wk,
    2) -> (B, M, HW, D), a view of a token-major buffer."""
    if not supported(table, q):
        raise ValueError(f"kernel 'triton': needs Triton and torch >= 2.6, a table of at most {triton_bias.MAX_TABLE}"
                         f" x {triton_bias.MAX_TABLE} and a head size that is a power of two from 16 to 128; got "
                         f"table {tuple(table.shape[-2:])}, head size {q.shape[-1]}: use kernel 'auto' or 'sdpa'")
    if not q.is_cuda and not triton_bias.interpreted():
        raise RuntimeError(f"kernel 'triton': the Triton kernels run on CUDA devices, not {q.device.type} (or in "
                           "Triton's interpreter: TRITON_INTERPRET=1); use kernel 'auto' or 'sdpa'")
    triton_bias.check_operands(table, query_y, query_x, positions, groups)
    return _attention_forward(q, k, v, table, query_y, query_x, positions, groups, scale)[0]
