"""Geometry of DAT as pure functions: reference points, offsets, sampling positions, displacements,
and Swin's window index and shift mask. Coordinates are normalised to [-1, 1] in (y, x) order, as
`grid_sample(..., align_corners=True)` reads them once flipped to (x, y). See DAT_SPEC section 2.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def grid_points(h: int, w: int, *, convention: str = "released", device=None, dtype=None) -> Tensor:
    """Normalised (y, x) centres of an h x w grid, (h, w, 2).

    "released": (i + 0.5) / n * 2 - 1, as in the released code (not pixel-exact under align_corners).
    "aligned": i / (n - 1) * 2 - 1 (0 when n = 1), which grid_sample reads as exactly pixel i.
    """

    def axis(n: int) -> Tensor:
        i = torch.arange(n, device=device, dtype=dtype or torch.float32)
        if convention == "released":
            return (i + 0.5) / n * 2 - 1
        if convention == "aligned":
            return i / (n - 1) * 2 - 1 if n > 1 else torch.zeros_like(i)
        raise ValueError(f"reference: {convention!r} is not one of released, aligned")

    ys, xs = torch.meshgrid(axis(h), axis(w), indexing="ij")
    return torch.stack((ys, xs), dim=-1)  # (h, w, 2)


def bounded_offsets(raw: Tensor, offset_range: float) -> Tensor:
    """Offsets (..., hk, wk, 2) in normalised units from raw network output (same shape).

    s > 0: s * tanh(raw) / (hk, wk), so a point moves at most s/2 key-grid cells on each axis.
    s = 0: no offset. s < 0 (released "unbounded" mode): raw, unchanged.
    """
    if offset_range < 0:
        return raw
    if offset_range == 0:
        return torch.zeros_like(raw)
    return _per_axis(raw.tanh(), offset_range / raw.shape[-3], offset_range / raw.shape[-2])


def _per_axis(t: Tensor, y: float, x: float) -> Tensor:
    """t (..., 2) times y on its first and x on its second coordinate, by Python numbers: a tensor made
    of them would be copied to the device on every call, and such a copy waits for the GPU's queue."""
    return t * y if y == x else torch.stack((t[..., 0] * y, t[..., 1] * x), dim=-1)


def sampling_positions(reference: Tensor, offsets: Tensor | None, offset_range: float) -> Tensor:
    """Where keys are sampled: reference + offsets; squashed by tanh in the unbounded (s < 0) mode."""
    if offsets is None:
        return reference
    pos = reference + offsets
    return pos.tanh() if offset_range < 0 else pos


def displacement(query_grid: Tensor, positions: Tensor, *, coordinate_planes: bool = False) -> Tensor:
    """Half the (query - key) vector for every query and sample: (N, H*W, Ns, 2), in [-1, 1] for
    the relative-bias table of size (2H-1, 2W-1).  query_grid (H, W, 2), positions (N, Hk, Wk, 2).
    coordinate_planes: the same values, laid out in memory as one (N, H*W, Ns) plane per coordinate
    (a permuted view; grid_sample reads either): built several times faster than the interleaved
    (..., 2) layout, whose innermost dimension of 2 defeats vectorisation. Gradients are equal up to
    the order of summation."""
    N = positions.shape[0]
    if coordinate_planes:
        return _PlanarDisplacement.apply(query_grid, positions)
    q = query_grid.reshape(1, -1, 1, 2) * 0.5  # (1, HW, 1, 2); halving is exact, so halve the small
    k = positions.reshape(N, 1, -1, 2) * -0.5  # (N, 1, Ns, 2) operands, not the sum;
    return q + k  # negated small too: autograd then negates the reduced gradient, not the full one


class _PlanarDisplacement(torch.autograd.Function):
    """displacement(..., coordinate_planes=True) with a backward that reduces the incoming (N, HW,
    Ns, 2) gradient as it lies (grid_sample's is interleaved), instead of through the planes'
    permuted view, where summing over HW is several times slower."""

    @staticmethod
    def forward(ctx, query_grid: Tensor, positions: Tensor) -> Tensor:
        ctx.shapes = query_grid.shape, positions.shape
        N = positions.shape[0]
        q = (query_grid.reshape(-1, 2) * 0.5).t().contiguous().reshape(2, 1, -1, 1)  # (2, 1, HW, 1)
        k = (positions.reshape(N, -1, 2) * -0.5).permute(2, 0, 1).contiguous().unsqueeze(2)  # (2, N, 1, Ns)
        return (q + k).permute(1, 2, 3, 0)  # (N, HW, Ns, 2), planes in memory

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        q_shape, k_shape = ctx.shapes
        grad_q = grad.sum((0, 2)).reshape(q_shape) * 0.5 if ctx.needs_input_grad[0] else None
        grad_k = grad.sum(1).reshape(k_shape) * -0.5 if ctx.needs_input_grad[1] else None
        return grad_q, grad_k


def interpolation_weights(coords: Tensor, size: int) -> Tensor:
    """Weights (..., size) of linear interpolation along one axis of `size` pixels at normalised
    coords (...), as grid_sample(align_corners=True, padding_mode="zeros") reads them: at
    t = (coord + 1) / 2 * (size - 1), 1 - f on pixel floor(t) and f = t - floor(t) on the next; a
    pixel outside the axis weighs nothing. Differentiable in coords the way grid_sample is (at a
    whole t, the slope towards the next pixel)."""
    t = (coords + 1) * (0.5 * (size - 1))
    t0 = t.detach().floor()
    f = (t - t0).unsqueeze(-1)
    i = torch.arange(size, device=coords.device, dtype=coords.dtype) - t0.unsqueeze(-1)  # pixel - floor(t)
    return (1 - f) * (i == 0) + f * (i == 1)


def log_cpb_coords(query_grid: Tensor, positions: Tensor) -> Tensor:
    """DAT++'s log-spaced coordinates sign(d) log2(|d| + 1) / log2(8) of d = 4 (query - key)."""
    d = displacement(query_grid, positions) * 8.0
    return torch.sign(d) * torch.log2(d.abs() + 1.0) / math.log2(8.0)


def offsets_in_cells(positions: Tensor, reference: Tensor) -> Tensor:
    """Displacement of each sample from its reference point in key-grid cells, (..., hk, wk, 2)."""
    hk, wk = reference.shape[-3], reference.shape[-2]
    return _per_axis(positions - reference, hk / 2, wk / 2)


def window_relative_index(window: int, table_window: int, *, device=None) -> Tensor:
    """Swin's relative_position_index: (w*w, w*w) rows of a ((2t-1)^2, heads) table, t = table_window.

    Entry [i, j] is (dy + t - 1) * (2t - 1) + (dx + t - 1) for (dy, dx) = query i - key j, so a
    window smaller than the table's (a clamped window) reads the table's central part.
    """
    i = torch.arange(window, device=device)
    ys, xs = torch.meshgrid(i, i, indexing="ij")
    coords = torch.stack((ys.flatten(), xs.flatten()))  # (2, w*w)
    rel = coords[:, :, None] - coords[:, None, :] + (table_window - 1)  # (2, w*w, w*w)
    return rel[0] * (2 * table_window - 1) + rel[1]


def shifted_window_mask(h: int, w: int, window: int, shift: int, *, across: float = -100.0, device=None) -> Tensor:
    """Swin's attn_mask (nW, window^2, window^2): 0 within a region, `across` (Swin's -100) across regions."""
    labels = torch.zeros(h, w, device=device)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for n, (ys, xs) in enumerate((ys, xs) for ys in cuts for xs in cuts):
        labels[ys, xs] = n
    windows = labels.reshape(h // window, window, w // window, window).transpose(1, 2)
    windows = windows.reshape(-1, window * window)  # (nW, w*w)
    diff = windows[:, None, :] - windows[:, :, None]
    return torch.where(diff == 0, 0.0, across)


def key_grid_size(h: int, w: int, key_downsample: int) -> tuple[int, int]:
    """Size of the key grid of a D block: what a stride-r conv with 'same' odd padding gives."""
    return math.ceil(h / key_downsample), math.ceil(w / key_downsample)
