"""Known-answer tests of the geometry helpers and of the deformable block's sampling."""

import pytest
import torch
import torch.nn.functional as F

from dat_lab.models import StageConfig
from dat_lab.models.attention import DeformableAttention
from dat_lab.models.geometry import (bounded_offsets, displacement, grid_points, interpolation_weights,
                                     offsets_in_cells, sampling_positions, shifted_window_mask,
                                     window_relative_index)


def test_displacement_known_values_in_both_layouts():
    q_grid = torch.tensor([[[-0.5, 0.0]], [[0.5, 0.0]]])  # (2, 1, 2): two queries
    pos = torch.tensor([[[[0.5, 1.0]]], [[[-1.0, 0.0]]]], requires_grad=True)  # (N 2, 1, 1, 2): one key each
    d = displacement(q_grid, pos)  # (q - k) / 2
    expected = torch.tensor([[[[-0.5, -0.5]], [[0.0, -0.5]]], [[[0.25, 0.0]], [[0.75, 0.0]]]])
    torch.testing.assert_close(d, expected)
    assert torch.equal(displacement(q_grid, pos, coordinate_planes=True), d)
    # DAT-T stage-2 sizes: the same values, one plane per coordinate; gradients up to summation order
    q_grid = grid_points(14, 14).requires_grad_()
    pos = (torch.rand(6, 14, 14, 2) * 2 - 1).requires_grad_()
    d, planes = displacement(q_grid, pos), displacement(q_grid, pos, coordinate_planes=True)
    assert torch.equal(planes, d) and planes.stride(-1) != 1
    g = torch.randn_like(d)
    for a, b in zip(torch.autograd.grad(planes, (q_grid, pos), g), torch.autograd.grad(d, (q_grid, pos), g)):
        torch.testing.assert_close(a, b)


def test_grid_points_known_values():
    torch.testing.assert_close(grid_points(2, 1)[..., 0].flatten(), torch.tensor([-0.5, 0.5]))
    torch.testing.assert_close(grid_points(1, 4)[..., 1].flatten(), torch.tensor([-0.75, -0.25, 0.25, 0.75]))
    torch.testing.assert_close(grid_points(3, 1, convention="aligned")[..., 0].flatten(), torch.tensor([-1.0, 0.0, 1.0]))
    assert grid_points(1, 1, convention="aligned").abs().sum() == 0
    assert grid_points(2, 3).shape == (2, 3, 2)
    with pytest.raises(ValueError, match="reference"):
        grid_points(2, 2, convention="centre")


def test_aligned_grid_samples_exactly_the_input():
    x = torch.randn(2, 5, 6, 7)
    grid = grid_points(6, 7, convention="aligned").flip(-1).expand(2, 6, 7, 2)
    torch.testing.assert_close(F.grid_sample(x, grid, align_corners=True), x, atol=1e-6, rtol=0)
    released = grid_points(6, 7).flip(-1).expand(2, 6, 7, 2)
    assert (F.grid_sample(x, released, align_corners=True) - x).abs().max() > 1e-2  # a slight resampling


def _block(**stage) -> DeformableAttention:
    cfg = StageConfig(dim=8, depth=2, heads=2, blocks="LD", groups=2, **stage)
    block = DeformableAttention(stage=cfg, q_size=(6, 6), attn_drop=0.0, proj_drop=0.0).eval()
    block.reference = True  # the reference path runs proj_k as a module, so a hook sees the sampled keys
    return block


def test_zero_offsets_aligned_r1_keys_are_the_input():
    block = _block(reference="aligned")
    torch.nn.init.zeros_(block.conv_offset[3].weight)
    seen = {}
    block.proj_k.register_forward_hook(lambda m, inp, out: seen.setdefault("samples", inp[0]))
    x = torch.randn(2, 8, 6, 6)
    _, info = block(x.permute(0, 2, 3, 1))  # blocks take channels-last maps
    torch.testing.assert_close(seen["samples"], x, atol=1e-6, rtol=0)
    torch.testing.assert_close(info["positions"], info["references"])


def test_no_offset_block_samples_at_reference_and_builds_no_offset_network():
    block = _block(offsets=False, reference="aligned")
    assert block.conv_offset is None
    seen = {}
    block.proj_k.register_forward_hook(lambda m, inp, out: seen.setdefault("samples", inp[0]))
    x = torch.randn(1, 8, 6, 6)
    block(x.permute(0, 2, 3, 1))
    torch.testing.assert_close(seen["samples"], x, atol=1e-6, rtol=0)
    assert _block(offset_range=0.0).conv_offset is None  # s = 0: no offset at all


@pytest.mark.parametrize("s", [0.5, 2.0, 5.0])
def test_huge_raw_offsets_stay_inside_s(s):
    raw = torch.randn(3, 4, 5, 2) * 1e6
    off = bounded_offsets(raw, s)
    assert (off[..., 0].abs() <= s / 4 + 1e-6).all() and (off[..., 1].abs() <= s / 5 + 1e-6).all()
    block = _block(offset_range=s, key_downsample=2)
    torch.nn.init.constant_(block.conv_offset[3].weight, 1e4)
    _, info = block(torch.randn(2, 6, 6, 8))
    cells = offsets_in_cells(info["positions"], info["references"])  # (B, G, 3, 3, 2)
    assert info["positions"].shape == (2, 2, 3, 3, 2)
    assert cells.abs().max() <= s / 2 + 1e-4 and cells.abs().max() >= s / 2 - 1e-3


def test_offset_modes():
    raw = torch.full((1, 2, 2, 2), 10.0)
    assert bounded_offsets(raw, 0).abs().sum() == 0
    assert torch.equal(bounded_offsets(raw, -1), raw)
    ref = grid_points(2, 2).unsqueeze(0)
    torch.testing.assert_close(sampling_positions(ref, raw, -1), torch.tanh(ref + raw))  # unbounded: squashed
    torch.testing.assert_close(sampling_positions(ref, bounded_offsets(raw, 1), 1), ref + 0.5 * torch.tanh(raw))


def test_window_relative_index_known_values():
    index = window_relative_index(2, 2)  # table 3x3, (dy + 1) * 3 + (dx + 1) for query - key
    assert index.tolist() == [[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]]
    # a clamped 1x1 window reads the table centre
    assert window_relative_index(1, 7).tolist() == [[6 * 13 + 6]]


def test_shifted_window_mask_known_values():
    mask = shifted_window_mask(4, 4, 2, 1)  # 4 windows of 2x2
    assert mask.shape == (4, 4, 4)
    assert mask[0].abs().sum() == 0  # the first window is one region
    # the last window holds four regions: every token sees only itself
    assert torch.equal(mask[3] == 0, torch.eye(4, dtype=torch.bool))
    assert set(mask.unique().tolist()) == {0.0, -100.0}
    assert torch.equal(shifted_window_mask(4, 4, 2, 1, across=float("-inf")).isinf(), mask == -100.0)


def test_interpolation_weights_known_values():
    w = interpolation_weights(torch.tensor([-1.0, 0.25, 1.0, 1.2, -1.5, 3.0]), 3)  # pixels at -1, 0, 1
    expected = [[1, 0, 0], [0, 0.75, 0.25], [0, 0, 1], [0, 0, 0.8], [0.5, 0, 0], [0, 0, 0]]
    torch.testing.assert_close(w, torch.tensor(expected))  # outside the axis: that corner weighs nothing


def test_dense_sampling_equals_grid_sample():
    """The deterministic samplers (interpolation matrices) against grid_sample, values and gradients,
    with points inside, on the border of and outside the map."""
    from dat_lab.models.attention import _relative_bias_dense, _sample_dense

    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 6, 4, requires_grad=True)  # (B, G, H, W, Cg)
    pos = (torch.rand(6, 3, 4, 2) * 2.6 - 1.3).requires_grad_()  # (B*G, Hk, Wk, 2), (y, x)
    dense = _sample_dense(x.flatten(2, 3), pos.reshape(2, 3, 12, 2), 5, 6)  # (B, Ns, G*Cg)
    plain = F.grid_sample(x.permute(0, 1, 4, 2, 3).reshape(6, 4, 5, 6), pos.flip(-1), align_corners=True)
    plain = plain.reshape(2, 3, 4, 12).permute(0, 3, 1, 2).reshape(2, 12, 12)
    g = torch.randn_like(plain)
    torch.testing.assert_close(dense, plain, atol=1e-6, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(dense, (x, pos), g), torch.autograd.grad(plain, (x, pos), g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

    # on whole pixels (zero offsets on the aligned grid): the one-sided slope grid_sample takes
    on_pixels = grid_points(5, 6, convention="aligned").expand(2, 3, 5, 6, 2).reshape(2, 3, 30, 2).requires_grad_()
    dense = _sample_dense(x.flatten(2, 3), on_pixels, 5, 6)
    plain = F.grid_sample(x.permute(0, 1, 4, 2, 3).reshape(6, 4, 5, 6), on_pixels.reshape(6, 5, 6, 2).flip(-1),
                          align_corners=True).reshape(2, 3, 4, 30).permute(0, 3, 1, 2).reshape(2, 30, 12)
    g = torch.randn_like(plain)
    torch.testing.assert_close(torch.autograd.grad(dense, on_pixels, g)[0], torch.autograd.grad(plain, on_pixels, g)[0],
                               atol=1e-5, rtol=1e-5)

    table = torch.randn(6, 2, 9, 11, requires_grad=True)  # (N, heads per group, 2H-1, 2W-1)
    q_grid = grid_points(5, 6)
    dense = _relative_bias_dense(table, q_grid, pos).reshape(6, 2, 30, 12)
    plain = F.grid_sample(table, displacement(q_grid, pos).flip(-1), align_corners=True)  # (N, 2, HW, Ns)
    g = torch.randn_like(plain)
    torch.testing.assert_close(dense, plain, atol=1e-6, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(dense, (table, pos), g), torch.autograd.grad(plain, (table, pos), g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # keys on the query grid: a query's own key sits on the table's centre, a whole pixel
    pos = grid_points(5, 6).expand(6, 5, 6, 2).clone().requires_grad_()
    dense = _relative_bias_dense(table, q_grid, pos).reshape(6, 2, 30, 30)
    plain = F.grid_sample(table, displacement(q_grid, pos).flip(-1), align_corners=True)
    g = torch.randn_like(plain)
    torch.testing.assert_close(torch.autograd.grad(dense, pos, g)[0], torch.autograd.grad(plain, pos, g)[0],
                               atol=1e-5, rtol=1e-5)
