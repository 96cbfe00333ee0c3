"""The attention blocks of DAT, bottom up: window (L), shifted window (S), spatial-reduction (P) and
deformable (D) attention. All take and give channels-last maps (B, H, W, C), the layout the
stages keep between blocks (LayerNorm and the token MLP need no copies); D and P blocks work
channel-first inside, as the released code does. Each returns
`(y, info)` where `info` is None, or for D blocks a dict of sampling positions and reference points
(B, G, Hk, Wk, 2) and, when asked, the attention (B, heads, H*W, Ns). Parameter names follow the
released checkpoints (DAT_SPEC sections 1-2).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from . import cpu_kernels, triton_attention, triton_bias
from .config import StageConfig
from .geometry import (bounded_offsets, displacement, grid_points, interpolation_weights, key_grid_size,
                       log_cpb_coords, sampling_positions, shifted_window_mask, window_relative_index)


def _cached(cache: dict, key: tuple, build: Callable[[], Any]) -> Any:
    """cache[key], built on first use outside inference mode (so later passes with gradients can use it)."""
    if key not in cache:
        with torch.inference_mode(False):
            cache[key] = build()
    return cache[key]


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map (the released `LayerNormProxy`)."""

    def __init__(self, *, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class WindowAttention(nn.Module):
    """Swin window attention (block L).

    Maps are padded to a multiple of the window; a map no larger than the window uses one window
    of the map's size and no shift (Swin's rule). Index and mask are built once per map size, on
    the map's device.
    """

    shifted = False

    def __init__(self, *, stage: StageConfig, q_size: tuple[int, int], attn_drop: float, proj_drop: float) -> None:
        super().__init__()
        dim, self.heads, self.window = stage.dim, stage.heads, stage.window
        self.scale = (dim // self.heads) ** -0.5
        self.proj_qkv = nn.Linear(dim, 3 * dim)
        self.proj_out = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * self.window - 1) ** 2, self.heads))
        trunc_normal_(self.relative_position_bias_table, std=0.01)
        self._cache: dict[tuple, tuple[Tensor, Tensor | None]] = {}

    def _layout(self, h: int, w: int) -> tuple[int, int]:
        """(window, shift) for an h x w map."""
        if min(h, w) <= self.window:
            return min(h, w), 0
        return self.window, math.ceil(self.window / 2) if self.shifted else 0

    def _bias_and_mask(self, hp: int, wp: int, window: int, shift: int, like: Tensor) -> tuple[Tensor, Tensor | None]:
        def build() -> tuple[Tensor, Tensor | None]:
            index = window_relative_index(window, self.window, device=like.device)
            if not shift:
                return index, None
            # Swin's -100 made -inf: the same softmax in float32 (e^-100 is below its normal range), but
            # no denormal weights, which slow the matmuls after it many times on x86 CPUs
            mask = shifted_window_mask(hp, wp, window, shift, across=float("-inf"), device=like.device)
            return index, mask.to(like.dtype)

        index, mask = _cached(self._cache, (hp, wp, window, shift, like.device, like.dtype), build)
        n = window * window
        bias = self.relative_position_bias_table[index.flatten()].reshape(n, n, -1).permute(2, 0, 1)
        return bias, mask  # (heads, n, n), (nW, n, n)

    def forward(self, x: Tensor, *, return_attention: bool = False) -> tuple[Tensor, None]:
        B, H, W, C = x.shape
        window, shift = self._layout(H, W)
        pad_h, pad_w = -H % window, -W % window
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        Hp, Wp = H + pad_h, W + pad_w
        if shift:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        nh, nw, n = Hp // window, Wp // window, window * window
        # (B, nh*w, nw*w, C) -> (B*nW, n, C)
        t = x.reshape(B, nh, window, nw, window, C).transpose(2, 3).reshape(-1, n, C)
        q, k, v = self.proj_qkv(t).reshape(-1, n, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B*nW, heads, n, n)
        bias, mask = self._bias_and_mask(Hp, Wp, window, shift, x)
        attn = attn + bias.unsqueeze(0)
        if mask is not None:
            attn = (attn.reshape(B, nh * nw, self.heads, n, n) + mask[None, :, None]).reshape(-1, self.heads, n, n)
        attn = self.attn_drop(attn.softmax(dim=-1))
        t = (attn @ v).transpose(1, 2).reshape(-1, n, C)  # (B*nW, n, C)
        t = self.proj_drop(self.proj_out(t))
        x = t.reshape(B, nh, nw, window, window, C).transpose(2, 3).reshape(B, Hp, Wp, C)
        if shift:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        return x[:, :H, :W], None


class ShiftedWindowAttention(WindowAttention):
    """Swin shifted-window attention (block S): the map rolled by -ceil(w/2) first, masked across regions."""

    shifted = True


class PyramidAttention(nn.Module):
    """PVT spatial-reduction attention (block P): keys and values from a map reduced sr times."""

    def __init__(self, *, stage: StageConfig, q_size: tuple[int, int], attn_drop: float, proj_drop: float) -> None:
        super().__init__()
        dim, self.heads, self.sr = stage.dim, stage.heads, stage.sr_ratio
        self.scale = (dim // self.heads) ** -0.5
        self.q = nn.Conv2d(dim, dim, 1)
        self.kv = nn.Conv2d(dim, 2 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        self.proj_ds = nn.Sequential(nn.Conv2d(dim, dim, self.sr, self.sr), LayerNorm2d(dim=dim)) if self.sr > 1 else None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, *, return_attention: bool = False) -> tuple[Tensor, None]:
        x = x.permute(0, 3, 1, 2)  # (B, C, H, W)
        B, C, H, W = x.shape
        hc = C // self.heads
        q = (self.q(x) * self.scale).reshape(B * self.heads, hc, H * W)
        k, v = self.kv(self.proj_ds(x) if self.proj_ds is not None else x).chunk(2, dim=1)
        k, v = k.reshape(B * self.heads, hc, -1), v.reshape(B * self.heads, hc, -1)
        attn = self.attn_drop((q.transpose(1, 2) @ k).softmax(dim=-1))  # (B*heads, HW, Nk)
        out = (v @ attn.transpose(1, 2)).reshape(B, C, H, W)
        return self.proj_drop(self.proj(out)).permute(0, 2, 3, 1), None


class DeformableAttention(nn.Module):
    """Deformable multi-head attention (block D), CVPR-2022 semantics (DAT_SPEC section 2).

    Queries from every pixel; keys and values from x bilinearly sampled at an Hk x Wk grid of
    reference points moved by offsets that a small network predicts from the queries, per group.
    `q_size` is the training-time map size; position tables adapt to other sizes.

    Two formulations of the same function: the default fast path (`_forward_fast`) and the plain
    released one (`_forward_reference`), equal to 1e-5 in outputs and gradients (tests). Options of
    the fast path (set them with `set_deformable_options`): `sampler` "auto" | "grid_sample" |
    "dense" | "triton" | "native" ("dense": bilinear sampling by interpolation matrices, whose
    backward is matrix products, so deterministic on CUDA; "triton": keys by grid_sample, the
    relative bias by the kernels of `triton_bias` (CUDA only; deterministic, the keys' grid_sample
    backward is not); "native": the relative bias, the keys and the offset conv's weight gradient by
    the C kernels of `cpu_kernels` (CPU only); "auto" on CUDA: the relative bias by the Triton
    kernels where they apply, keys by grid_sample, or dense when `torch.use_deterministic_algorithms`
    is on; "auto" on the CPU: "native" where the C kernels build, else "grid_sample"),
    `kernel` "auto" | "matmul" | "sdpa" | "triton" (fused `scaled_dot_product_attention` with the
    bias as its mask; "auto" takes it on CUDA; "triton": the kernels of `triton_attention`, which
    compute the relative bias inside the attention, CUDA only, not yet timed on a GPU; other position
    terms, head sizes other than 16, 32, 64 or 128, tables over 64 x 64, the attention asked for, or
    attention dropout in training take SDPA), `chunk_bytes` (CPU:
    logits, bias and probabilities are made, used and freed a few batch elements at a time, about this
    many bytes each).
    """

    chunk_bytes = 2**22

    def __init__(self, *, stage: StageConfig, q_size: tuple[int, int], attn_drop: float, proj_drop: float) -> None:
        super().__init__()
        dim, self.heads, self.groups = stage.dim, stage.heads, stage.groups
        self.group_dim = dim // self.groups
        self.scale = (dim // self.heads) ** -0.5
        self.r, self.s = stage.key_downsample, stage.offset_range
        self.position, self.convention = stage.position, stage.reference
        self.q_size = q_size
        self.reference = False  # True: the plain released formulation (see use_reference_attention)
        self.sampler, self.kernel = "auto", "auto"
        self._grids: dict[tuple, Any] = {}  # query and reference grids, query axes, by shape and device
        self.proj_q, self.proj_k, self.proj_v, self.proj_out = (nn.Conv2d(dim, dim, 1) for _ in range(4))
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)
        self.conv_offset = None
        if stage.has_offsets:
            k, cg = stage.offset_kernel, self.group_dim
            self.conv_offset = nn.Sequential(
                nn.Conv2d(cg, cg, k, stride=self.r, padding=k // 2, groups=cg),
                LayerNorm2d(dim=cg),
                nn.GELU(),
                nn.Conv2d(cg, 2, 1, bias=False),
            )
        self.rpe_table = self._position_term(dim, q_size)

    def _position_term(self, dim: int, q_size: tuple[int, int]) -> nn.Module | nn.Parameter | None:
        H, W = q_size
        if self.position == "relative":
            table = nn.Parameter(torch.zeros(self.heads, 2 * H - 1, 2 * W - 1))
        elif self.position == "fixed":
            table = nn.Parameter(torch.zeros(self.heads, H * W, math.prod(key_grid_size(H, W, self.r))))
        elif self.position == "dwconv":
            return nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        elif self.position == "log_cpb":
            return nn.Sequential(nn.Linear(2, 32), nn.ReLU(inplace=True), nn.Linear(32, self.heads // self.groups, bias=False))
        else:
            return None
        trunc_normal_(table, std=0.01)
        return table

    def _fixed_bias(self, H: int, W: int, Hk: int, Wk: int) -> Tensor:
        """The learned (heads, H*W, Hk*Wk) bias, resized bilinearly when the map size changed."""
        table = self.rpe_table
        H0, W0 = self.q_size
        Hk0, Wk0 = key_grid_size(H0, W0, self.r)
        if (H, W, Hk, Wk) == (H0, W0, Hk0, Wk0):
            return table
        t = F.interpolate(table.reshape(self.heads, H0 * W0, Hk0, Wk0), size=(Hk, Wk), mode="bilinear")
        t = t.reshape(self.heads, H0, W0, Hk * Wk).permute(0, 3, 1, 2)  # (heads, Ns, H0, W0)
        t = F.interpolate(t, size=(H, W), mode="bilinear")
        return t.flatten(2).transpose(1, 2)  # (heads, HW, Ns)

    def forward(self, x: Tensor, *, return_attention: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        """x (B, H, W, C) -> (B, H, W, C) and the sampling record (see the class docstring)."""
        forward = self._forward_reference if self.reference else self._forward_fast
        y, pos, reference, attn = forward(x, return_attention)
        B, G, (Hk, Wk) = x.shape[0], self.groups, pos.shape[1:3]
        if self.conv_offset is None:  # pos is then the cached grid, expanded: hand out a copy
            pos = pos.clone()
        info = {"positions": pos.reshape(B, G, Hk, Wk, 2), "references": reference.clone().expand(B, G, Hk, Wk, 2)}
        if return_attention:
            info["attention"] = attn.reshape(B, self.heads, -1, Hk * Wk)
        return y, info

    def _grid(self, h: int, w: int, like: Tensor) -> Tensor:
        """grid_points(h, w) (of the queries, or the keys' reference points) on like's device and dtype,
        made once per shape (internal: `forward` hands out copies)."""
        return _cached(self._grids, (h, w, like.device, like.dtype),
                       lambda: grid_points(h, w, convention=self.convention, device=like.device, dtype=like.dtype))

    def _query_axes(self, h: int, w: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """The query grid's y (h,) and x (w,) coordinates in float32, made once per shape."""
        def build() -> tuple[Tensor, Tensor]:
            grid = grid_points(h, w, convention=self.convention, device=like.device, dtype=torch.float32)
            return grid[:, 0, 0].contiguous(), grid[0, :, 1].contiguous()

        return _cached(self._grids, ("axes", h, w, like.device), build)

    def _positions(self, raw: Tensor | None, x: Tensor, H: int, W: int) -> tuple[Tensor, Tensor]:
        """Sampling positions (B*G, Hk, Wk, 2) from raw offsets (B*G, Hk, Wk, 2) or None; references (Hk, Wk, 2)."""
        B = x.shape[0]
        if raw is not None:
            (Hk, Wk), offsets = raw.shape[1:3], bounded_offsets(raw, self.s)
        else:
            (Hk, Wk), offsets = key_grid_size(H, W, self.r), None
        reference = self._grid(Hk, Wk, x)
        return sampling_positions(reference, offsets, self.s).expand(B * self.groups, Hk, Wk, 2), reference

    def _forward_reference(self, x: Tensor, return_attention: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The released formulation step by step: 1x1 convs on (B, C, H, W), the offset network on
        (B*G, Cg, H, W), grid_sample for keys and bias, einsum logits, scale, bias added, softmax, einsum."""
        x = x.permute(0, 3, 1, 2)  # (B, C, H, W)
        B, C, H, W = x.shape
        G, M, Cg, hc = self.groups, self.heads, self.group_dim, C // self.heads
        q = self.proj_q(x)  # (B, C, H, W)
        raw = None
        if self.conv_offset is not None:  # (B*G, 2, Hk, Wk), channels (dy, dx)
            raw = self.conv_offset(q.reshape(B * G, Cg, H, W)).permute(0, 2, 3, 1)
        pos, reference = self._positions(raw, x, H, W)  # (B*G, Hk, Wk, 2)
        Hk, Wk = pos.shape[1:3]
        samples = F.grid_sample(x.reshape(B * G, Cg, H, W), pos.flip(-1), mode="bilinear",
                                padding_mode="zeros", align_corners=True).reshape(B, C, Hk, Wk)
        k = self.proj_k(samples).reshape(B * M, hc, Hk * Wk)
        v = self.proj_v(samples).reshape(B * M, hc, Hk * Wk)
        attn = torch.einsum("bcm,bcn->bmn", q.reshape(B * M, hc, H * W), k) * self.scale  # (B*M, HW, Ns)
        bias = self._bias(B, H, W, pos, xy_grid=False)
        attn = attn + bias if bias is not None else attn
        attn = self.attn_drop(attn.softmax(dim=-1))
        out = torch.einsum("bmn,bcn->bcm", attn, v).reshape(B, C, H, W)
        if self.position == "dwconv":
            out = out + self.rpe_table(q)
        y = self.proj_drop(self.proj_out(out))
        return y.permute(0, 2, 3, 1), pos, reference, attn

    def _forward_fast(self, x: Tensor, return_attention: bool) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Channels-last throughout: the 1x1 projections as F.linear on (B, H, W, C), the offset network
        without regrouping q, the attention a few batch elements at a time (see `_attend`)."""
        B, H, W, C = x.shape
        M, hc = self.heads, C // self.heads
        q = _linear(self.proj_q, x)  # (B, H, W, C)
        raw = self._offsets_channels_last(q) if self.conv_offset is not None else None
        pos, reference = self._positions(raw, x, H, W)  # (B*G, Hk, Wk, 2)
        dense = dense_sampling(self.sampler, x.device.type)
        samples = self._sample_keys(x, pos, dense)  # (B, Ns, C)
        if not torch.compiler.is_compiling():  # compiled, Inductor fuses the casts (and torch 2.11's
            # dynamo breaks the graph at the autocast query): eager, token-major once in the dtype of the
            # products (autocast would cast it for each of the two)
            samples = samples.to(_product_dtype(samples), memory_format=torch.contiguous_format)
        k, v = _linear(self.proj_k, samples), _linear(self.proj_v, samples)  # (B, Ns, C)
        heads = (t.view(B, -1, M, hc).transpose(1, 2) for t in (q, k, v))  # (B, M, HW or Ns, hc) views
        out, attn = self._attend(*heads, pos, H, W, dense=dense, return_attention=return_attention)
        out = out.transpose(1, 2).reshape(B, H, W, C)  # SDPA's output lies so: no copy
        if self.position == "dwconv":
            out = out + self.rpe_table(q.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj_drop(_linear(self.proj_out, out)), pos, reference, attn

    def _native(self, *tensors: Tensor) -> bool:
        """Whether to use the C kernels of `cpu_kernels` on these operands: sampler "native", or "auto"
        on the CPU for float32 operands where the kernels built (else "auto" takes the plain ops)."""
        if not native_sampling(self.sampler, tensors[0].device.type):
            return False
        return self.sampler == "native" or (all(t.dtype == torch.float32 for t in tensors)
                                            and cpu_kernels.supported(*tensors))

    def _offsets_channels_last(self, q: Tensor) -> Tensor:
        """conv_offset on q (B, H, W, C) as it lies: the depthwise conv over all C channels with its
        kernel tiled per group, LayerNorm, GELU and the 1x1 conv on the last axis -> (B*G, Hk, Wk, 2).
        When training on the CPU, LayerNorm, GELU and the 1x1 conv are recomputed in the backward
        instead of keeping their (B, Hk, Wk, C) inputs (checkpointing: a little time for memory; on
        CUDA its bookkeeping costs more time than the GPU has to wait for)."""
        dw = self.conv_offset[0]
        x, weight = q.permute(0, 3, 1, 2), dw.weight.repeat(self.groups, 1, 1, 1)
        if self._native(x, weight):  # the weight's gradient by a C kernel
            t = cpu_kernels.depthwise_conv(x, weight, stride=dw.stride[0], padding=dw.padding[0])
        else:
            t = F.conv2d(x, weight, stride=dw.stride, padding=dw.padding, groups=q.shape[-1])
        # t: (B, C, Hk, Wk), channels-last in memory
        t = t.permute(0, 2, 3, 1).unflatten(-1, (self.groups, self.group_dim))  # (B, Hk, Wk, G, Cg)
        recompute = t.requires_grad and not t.is_cuda
        raw = checkpoint(self._offset_head, t, use_reentrant=False) if recompute else self._offset_head(t)
        return raw.permute(0, 3, 1, 2, 4).reshape(-1, *raw.shape[1:3], 2)

    def _offset_head(self, t: Tensor) -> Tensor:
        """(B, Hk, Wk, G, Cg) depthwise-conv output without its bias -> raw offsets (B, Hk, Wk, G, 2)."""
        dw, norm, act, pw = self.conv_offset
        t = act(norm.norm(t + dw.bias))  # the conv's bias added apart: its gradient is then a plain sum
        return F.linear(t, pw.weight.flatten(1))

    def _sample_keys(self, x: Tensor, pos: Tensor, dense: bool) -> Tensor:
        """x (B, H, W, C) sampled per group at pos (B*G, Hk, Wk, 2): (B, Hk*Wk, C) (grid_sample's: a
        transposed view, made token-major by the caller's cast)."""
        B, H, W, C = x.shape
        G, Cg = self.groups, self.group_dim
        if dense:
            return _sample_dense(x.reshape(B, H * W, G, Cg).transpose(1, 2), pos.reshape(B, G, -1, 2), H, W)
        if self._native(x, pos):
            return cpu_kernels.sample_keys(x, pos, groups=G)  # float32 only; channels-last as it lies
        s = F.grid_sample(x.permute(0, 3, 1, 2).reshape(B * G, Cg, H, W), pos.flip(-1), mode="bilinear",
                          padding_mode="zeros", align_corners=True)  # (B*G, Cg, Hk, Wk)
        return s.reshape(B, C, -1).transpose(1, 2)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, pos: Tensor, H: int, W: int, *, dense: bool,
                return_attention: bool) -> tuple[Tensor, Tensor | None]:
        """Heads of q (B, M, HW, hc), k and v (B, M, Ns, hc) (views of token-major tensors) ->
        (B, M, HW, hc), and the attention (B*M, HW, Ns) when asked. On CUDA in one piece, fused (SDPA
        with the bias as mask, on the views as they lie) unless the attention is asked for; on the
        CPU a few batch elements at a time, so that the (HW x Ns) logits, bias and probabilities of
        only those are alive at once (and stay in cache): the scale folded into the matmul, the bias
        added by it (baddbmm). Kernel "triton" (where it applies): the fused kernels, the relative bias
        read inside them."""
        B, M, HW, hc = q.shape
        G, Ns = self.groups, k.shape[2]
        if self.kernel == "triton" and self.position == "relative" and not return_attention \
                and not (self.training and self.attn_drop.p > 0) and triton_attention.supported(self.rpe_table, q):
            axes = self._query_axes(H, W, pos)
            return triton_attention.deformable_attention(q, k, v, self.rpe_table, *axes, pos, groups=G,
                                                         scale=self.scale), None
        fused = fused_kernel(self.kernel, q.device.type) and not return_attention
        step = B if q.is_cuda else max(1, self.chunk_bytes // (M * HW * Ns * q.element_size()))
        # split, not sliced: one gradient buffer per input, not one per piece; in one piece not split at
        # all (the backward of a split concatenates the gradients: a copy of each, out of the views' layout)
        pieces = [(q, k, v, pos)] if step >= B else zip(q.split(step), k.split(step), v.split(step), pos.split(step * G))
        outs, attns = [], []
        for qc, kc, vc, pc in pieces:
            n = qc.shape[0]
            bias = self._bias(n, H, W, pc, xy_grid=True, dense=dense, dtype=qc.dtype)  # (n*M, HW, Ns)
            if fused:
                p = self.attn_drop.p if self.training else 0.0
                # autocast: q in bf16, a bias made by grid_sample in float32
                mask = bias.to(qc.dtype).view(n, M, HW, Ns) if bias is not None else None
                outs.append(F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, dropout_p=p, scale=self.scale))
                continue
            qc, kc, vc = (t.reshape(n * M, -1, hc) for t in (qc, kc, vc))  # heads-major copies of the piece
            if bias is None:
                logits = torch.bmm(qc, kc.transpose(1, 2)) * self.scale
            else:
                logits = torch.baddbmm(bias, qc, kc.transpose(1, 2), alpha=self.scale)  # (n*M, HW, Ns)
            attn = self.attn_drop(logits.softmax(dim=-1))
            outs.append(torch.bmm(attn, vc).view(n, M, HW, hc))
            if return_attention:
                attns.append(attn)
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out, (torch.cat(attns) if return_attention else None)

    def _bias(self, B: int, H: int, W: int, pos: Tensor, *, xy_grid: bool, dense: bool = False,
              dtype: torch.dtype | None = None) -> Tensor | None:
        """Position bias added to the logits, (B*M, HW, Ns), or None. pos (B*G, Hk, Wk, 2). The
        Triton kernels (when chosen) give it in `dtype`, the other paths in the table's dtype."""
        G, M = self.groups, self.heads
        Hk, Wk = pos.shape[1:3]
        if self.position in ("none", "dwconv"):
            return None
        if self.position == "fixed":
            return self._fixed_bias(H, W, Hk, Wk).repeat(B, 1, 1)
        q_grid = self._grid(H, W, pos)
        if self.position == "log_cpb":
            bias = self.rpe_table(log_cpb_coords(q_grid, pos))  # (B*G, HW, Ns, M/G)
            return bias.permute(0, 3, 1, 2).reshape(B * M, H * W, Hk * Wk)
        # relative: the (M, 2H-1, 2W-1) table read at half the query-key displacement
        if xy_grid and triton_sampling(self.sampler, pos.device.type):
            if triton_bias.supported(self.rpe_table) or self.sampler == "triton":  # else: "auto" falls back
                return triton_bias.relative_bias(self.rpe_table, *self._query_axes(H, W, pos), pos, groups=G,
                                                 dtype=dtype or pos.dtype)
        if xy_grid and self._native(self.rpe_table, pos):
            return cpu_kernels.relative_bias(self.rpe_table, *self._query_axes(H, W, pos), pos, groups=G)
        table = self.rpe_table.reshape(1, G, M // G, *self.rpe_table.shape[1:])
        table = table.expand(B, -1, -1, -1, -1).reshape(B * G, M // G, *self.rpe_table.shape[1:])
        if dense:
            return _relative_bias_dense(table, q_grid, pos).reshape(B * M, H * W, Hk * Wk)
        if xy_grid:  # flip the small (H, W) and (Hk, Wk) grids, not the (HW x Ns) displacement; on the
            # CPU in coordinate planes (on CUDA cuDNN's sampler would copy them to the interleaved layout)
            grid = displacement(q_grid.flip(-1), pos.flip(-1), coordinate_planes=not pos.is_cuda)  # (B*G, HW, Ns, 2) as (x, y)
        else:
            grid = displacement(q_grid, pos).flip(-1)
        bias = F.grid_sample(table, grid, mode="bilinear", align_corners=True)  # (B*G, M/G, HW, Ns)
        return bias.reshape(B * M, H * W, Hk * Wk)


def dense_sampling(sampler: str, device_type: str) -> bool:
    """Whether deformable blocks sample by interpolation matrices: asked for, or "auto" on CUDA with
    deterministic algorithms on (grid_sample's CUDA backward has no deterministic kernel)."""
    return sampler == "dense" or (sampler == "auto" and device_type == "cuda"
                                  and torch.are_deterministic_algorithms_enabled())


def triton_sampling(sampler: str, device_type: str) -> bool:
    """Whether deformable blocks read the relative-position table with the Triton kernels of
    `triton_bias` (deterministic, no atomics): asked for, or "auto" on CUDA."""
    return sampler == "triton" or (sampler == "auto" and device_type == "cuda")


def native_sampling(sampler: str, device_type: str) -> bool:
    """Whether deformable blocks take the C kernels of `cpu_kernels` (relative bias, keys, the offset
    conv's weight gradient): asked for, or "auto" on the CPU (for float32 operands, where they build)."""
    return sampler == "native" or (sampler == "auto" and device_type == "cpu")


def fused_kernel(kernel: str, device_type: str) -> bool:
    """Whether deformable blocks attend with scaled_dot_product_attention: asked for, "auto" on CUDA
    (on the CPU its backward with a bias that needs a gradient is PyTorch's slower math path), or
    "triton" where its kernel does not apply."""
    return kernel in ("sdpa", "triton") or (kernel == "auto" and device_type == "cuda")


def _product_dtype(x: Tensor) -> torch.dtype:
    """The dtype autocast gives matrix products on x where it is on for x's device (it casts float32
    and half tensors, not float64 ones), else x's."""
    device = x.device.type
    if x.dtype != torch.float64 and torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _linear(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """A 1x1 convolution applied to a channels-last tensor (..., C) as a linear map."""
    return F.linear(x, conv.weight.flatten(1), conv.bias)


def _sample_dense(x: Tensor, pos: Tensor, H: int, W: int) -> Tensor:
    """Bilinear sampling as a matrix product (no scatter in the backward: deterministic on CUDA).
    x (B, G, H*W, Cg) at pos (B, G, Ns, 2) -> (B, Ns, G*Cg), as grid_sample(align_corners=True) gives."""
    B, G, _, Cg = x.shape
    s = interpolation_weights(pos[..., 0], H)[..., :, None] * interpolation_weights(pos[..., 1], W)[..., None, :]
    return (s.flatten(-2) @ x).transpose(1, 2).reshape(B, -1, G * Cg)  # (B, G, Ns, HW) @ (B, G, HW, Cg)


def _relative_bias_dense(table: Tensor, q_grid: Tensor, pos: Tensor) -> Tensor:
    """The table (N, m, Ht, Wt) read bilinearly at half the query-key displacement by interpolation
    matrices per axis (matrix products, deterministic on CUDA): (N, m, H, W, Ns) as grid_sample gives.
    q_grid (H, W, 2), pos (N, Hk, Wk, 2)."""
    Ht, Wt = table.shape[-2:]
    wy = interpolation_weights(displacement(q_grid[:, :1], pos)[..., 0], Ht)  # (N, H, Ns, Ht)
    wx = interpolation_weights(displacement(q_grid[:1], pos)[..., 1], Wt)  # (N, W, Ns, Wt)
    return torch.einsum("niky,nmyx,njkx->nmijk", wy, table, wx)


SAMPLERS = ("auto", "grid_sample", "dense", "triton", "native")
KERNELS = ("auto", "matmul", "sdpa", "triton")


def set_deformable_options(model: nn.Module, *, reference: bool | None = None, sampler: str | None = None,
                           kernel: str | None = None, chunk_bytes: int | None = None) -> nn.Module:
    """Set the formulation of every deformable block of `model` (see DeformableAttention); None keeps."""
    if sampler is not None and sampler not in SAMPLERS:
        raise ValueError(f"sampler: {sampler!r} is not one of {', '.join(SAMPLERS)}")
    if kernel is not None and kernel not in KERNELS:
        raise ValueError(f"kernel: {kernel!r} is not one of {', '.join(KERNELS)}")
    if chunk_bytes is not None and chunk_bytes < 0:
        raise ValueError(f"chunk_bytes: {chunk_bytes} is negative; give a byte count >= 0")
    options = {"reference": reference, "sampler": sampler, "kernel": kernel, "chunk_bytes": chunk_bytes}
    for module in model.modules():
        if isinstance(module, DeformableAttention):
            for name, value in options.items():
                if value is not None:
                    setattr(module, name, value)
    return model


def use_reference_attention(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch every deformable block of `model` to the plain reference formulation (or back)."""
    return set_deformable_options(model, reference=enabled)


BLOCKS: dict[str, type[nn.Module]] = {
    "L": WindowAttention,
    "S": ShiftedWindowAttention,
    "D": DeformableAttention,
    "P": PyramidAttention,
}
"""Block letter -> attention class; every class takes (stage=, q_size=, attn_drop=, proj_drop=)."""
