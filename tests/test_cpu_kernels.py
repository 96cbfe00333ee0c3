"""The C kernels of the CPU's sampler "native" ("auto" there): the relative position bias and the
sampling of keys against grid_sample, the offset network's depthwise conv against conv2d, in values
and gradients; thread counts; inside the model; the build, its cache, and the fallback when no
compiler is found."""

import ctypes
import warnings

import pytest
import torch
import torch.nn.functional as F

import dat_lab
from dat_lab.models import cpu_kernels
from dat_lab.models.attention import set_deformable_options
from dat_lab.models.geometry import grid_points

from bias_reference import assert_close, axes, bias_and_gradients, grid_sample_bias, reference_and_fast

needs_kernels = pytest.mark.skipif(not cpu_kernels.available(),
                                   reason=f"no C kernels: {cpu_kernels._state.get('error')}")


def _case(H, W, Hk, Wk, heads, groups, images, spread, convention="released"):
    torch.manual_seed(0)
    table = torch.randn(heads, 2 * H - 1, 2 * W - 1, requires_grad=True)
    reference = grid_points(Hk, Wk, convention=convention)
    pos = (reference + spread * torch.randn(images * groups, Hk, Wk, 2)).requires_grad_()
    return table, grid_points(H, W, convention=convention), pos


def native_bias(table, query_grid, pos, groups):
    """The C kernels' bias, called as grid_sample_bias is."""
    return cpu_kernels.relative_bias(table, *axes(query_grid), pos, groups=groups)


@needs_kernels
@pytest.mark.parametrize("H, W, Hk, Wk, heads, groups, spread, convention", [
    (14, 14, 14, 14, 12, 3, 0.1, "released"),  # DAT-T stage 2: 4 heads a group, one vector
    (7, 9, 4, 5, 6, 2, 0.5, "released"),  # 3 heads a group (a spare lane), a smaller key grid (r = 2)
    (5, 5, 5, 5, 3, 1, 2.0, "released"),  # positions far outside [-1, 1]: corners outside the table
    (6, 6, 3, 3, 16, 2, 1.0, "aligned"),  # 8 heads a group: two vectors
    (4, 7, 4, 7, 10, 2, 0.0, "aligned"),  # 5 heads a group; keys on whole table pixels (no offsets)
])
def test_kernels_equal_grid_sample(H, W, Hk, Wk, heads, groups, spread, convention):
    table, query_grid, pos = _case(H, W, Hk, Wk, heads, groups, 2, spread, convention)
    upstream = torch.randn(pos.shape[0] * heads // groups, H * W, Hk * Wk)
    results = (bias_and_gradients(fn, table, query_grid, pos, groups, upstream)
               for fn in (grid_sample_bias, native_bias))
    for name, expected, actual in zip(("bias", "table", "positions"), *results):
        assert_close(actual, expected, name)


@needs_kernels
def test_any_thread_count_gives_the_same_result():
    """The bias: images cut into one span per thread, each thread's table gradient its own, summed in
    order: the same thread count gives the same bits, another count the same values. The keys: each
    (image, group) writes its own outputs and gradients: the same bits at any count."""
    table, query_grid, pos = _case(6, 6, 6, 6, 8, 2, 5, 0.3)
    x = torch.randn(5, 6, 6, 16, requires_grad=True)
    threads = torch.get_num_threads()
    bias_runs, key_runs = [], []
    try:
        for count in (1, 3, 3):
            torch.set_num_threads(count)
            bias = cpu_kernels.relative_bias(table, *axes(query_grid), pos, groups=2)
            bias_runs.append((bias, *torch.autograd.grad(bias, (table, pos), torch.ones_like(bias))))
            keys = cpu_kernels.sample_keys(x, pos, groups=2)
            key_runs.append((keys, *torch.autograd.grad(keys, (x, pos), torch.ones_like(keys))))
    finally:
        torch.set_num_threads(threads)
    for one, three, again in zip(*bias_runs):
        torch.testing.assert_close(three, one)
        assert torch.equal(again, three)
    for one, three, again in zip(*key_runs):
        assert torch.equal(three, one) and torch.equal(again, three)
    if hasattr(ctypes.CDLL(None), "GOMP_parallel"):  # torch's OpenMP runtime is loaded: the kernels use it
        assert cpu_kernels._state["variant"] == "openmp"


@needs_kernels
def test_gradient_of_the_positions_or_the_table_alone():
    """Where only one input needs a gradient, that one is grid_sample's (the other is not made)."""
    table, query_grid, pos = _case(4, 4, 4, 4, 4, 2, 1, 0.2)
    upstream = torch.randn(pos.shape[0] * 4 // 2, 16, 16)
    for alone in ("table", "positions"):
        gradients = []
        for fn in (grid_sample_bias, native_bias):
            inputs = {"table": table.detach().requires_grad_(alone == "table"),
                      "positions": pos.detach().requires_grad_(alone == "positions")}
            bias = fn(inputs["table"], query_grid, inputs["positions"], 2)
            (gradient,) = torch.autograd.grad(bias, inputs[alone], upstream)
            gradients.append(gradient)
        assert_close(gradients[1], gradients[0], alone)
    with torch.no_grad():
        assert not cpu_kernels.relative_bias(table, *axes(query_grid), pos, groups=2).requires_grad


def _grid_sample_keys(x, pos, groups):
    """The plain path: x (B, H, W, C) channel-first per group, read by grid_sample -> (B, Ns, C)."""
    B, H, W, C = x.shape
    samples = F.grid_sample(x.permute(0, 3, 1, 2).reshape(B * groups, C // groups, H, W), pos.flip(-1),
                            mode="bilinear", padding_mode="zeros", align_corners=True)
    return samples.reshape(B, C, -1).transpose(1, 2)


@needs_kernels
@pytest.mark.parametrize("B, H, W, C, groups, Hk, Wk, spread", [
    (2, 14, 14, 384, 3, 14, 14, 0.1),  # DAT-T stage 2
    (2, 7, 9, 30, 3, 4, 5, 0.7),  # 10 channels a group: two 4-wide vectors and 2 more
    (3, 5, 5, 5, 1, 5, 5, 2.0),  # positions far outside [-1, 1]
    (2, 6, 6, 8, 2, 3, 3, 0.0),  # on the reference points
])
def test_key_sampling_equals_grid_sample(B, H, W, C, groups, Hk, Wk, spread):
    torch.manual_seed(0)
    x = torch.randn(B, H, W, C, requires_grad=True)
    pos = (grid_points(Hk, Wk) + spread * torch.randn(B * groups, Hk, Wk, 2)).requires_grad_()
    expected = _grid_sample_keys(x, pos, groups)
    actual = cpu_kernels.sample_keys(x, pos, groups=groups)
    assert_close(actual, expected, "samples")
    grad = torch.randn_like(expected)
    for name, a, e in zip(("x", "positions"), torch.autograd.grad(actual, (x, pos), grad),
                          torch.autograd.grad(expected, (x, pos), grad)):
        assert_close(a, e, name)


@needs_kernels
@pytest.mark.parametrize("B, H, W, C, size, stride, padding", [
    (2, 14, 14, 384, 5, 1, 2),  # DAT-T stage 2's offset network
    (2, 9, 7, 70, 3, 2, 1),  # r = 2; channels past a 64-channel slice
    (1, 5, 5, 4, 1, 1, 0),
])
def test_depthwise_conv_equals_conv2d(B, H, W, C, size, stride, padding):
    torch.manual_seed(0)
    x = torch.randn(B, H, W, C).permute(0, 3, 1, 2).requires_grad_()  # channels-last, as the model has it
    weight = torch.randn(C, 1, size, size, requires_grad=True)
    expected = F.conv2d(x, weight, stride=stride, padding=padding, groups=C)
    actual = cpu_kernels.depthwise_conv(x, weight, stride=stride, padding=padding)
    assert_close(actual, expected, "output")
    grad = torch.randn_like(expected)
    for name, a, e in zip(("x", "weight"), torch.autograd.grad(actual, (x, weight), grad),
                          torch.autograd.grad(expected, (x, weight), grad)):
        assert_close(a, e, name)


@needs_kernels
@pytest.mark.parametrize("sampler", ["auto", "native"])
def test_model_uses_the_kernels_and_equals_the_reference(sampler, monkeypatch):
    calls = []
    for name in ("relative_bias", "sample_keys", "depthwise_conv"):
        kernel = getattr(cpu_kernels, name)
        monkeypatch.setattr(cpu_kernels, name, lambda *a, kernel=kernel, **k: calls.append(1) or kernel(*a, **k))
    torch.manual_seed(0)
    model = dat_lab.create_model("dat_pico", key_downsample=[1, 1, 2, 1]).eval()
    x = torch.randn(2, 3, 32, 32)
    passes = reference_and_fast(model, x, sampler=sampler)
    assert len(calls) == 6  # bias, keys and offset conv of the two deformable blocks of dat_pico, 2nd pass
    for name, expected in passes[0].items():
        assert_close(passes[1][name], expected, name)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, "autocast"])
def test_auto_keeps_other_dtypes_on_the_plain_ops(dtype):
    """The kernels compute in float32: "auto" gives them float32 operands only; a float64 or bfloat16
    model, or bfloat16 autocast, runs on grid_sample and conv2d, as with sampler "grid_sample"."""
    torch.manual_seed(0)
    model = dat_lab.create_model("dat_pico").eval()
    x = torch.randn(2, 3, 32, 32)
    if dtype != "autocast":
        model, x = model.to(dtype), x.to(dtype)
    outputs = []
    for sampler in ("auto", "grid_sample"):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "autocast"):
            logits = set_deformable_options(model, sampler=sampler)(x)
        logits.float().square().sum().backward()
        outputs.append([logits.detach()] + [p.grad.clone() for p in model.parameters()])
    for auto, plain in zip(*outputs):
        assert torch.equal(auto, plain)


@needs_kernels
@pytest.mark.parametrize("op, args", [
    ("relative_bias_cpu", lambda: (torch.randn(4, 7, 7), *axes(grid_points(4, 4)), torch.rand(4, 3, 3, 2) * 2 - 1, 2)),
    ("sample_keys_cpu", lambda: (torch.randn(2, 4, 4, 6), torch.rand(4, 3, 3, 2) * 2 - 1, 2)),
    ("depthwise_conv_cpu", lambda: (torch.randn(2, 4, 4, 6).permute(0, 3, 1, 2), torch.randn(6, 1, 3, 3), 1, 1)),
])
def test_ops_pass_torch_library_opcheck(op, args):
    """Schema, fake (meta) implementation, autograd registration: what torch.compile relies on."""
    tensors = [a.contiguous() if isinstance(a, torch.Tensor) and a.dim() == 1 else a for a in args()]
    tensors = [a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dim() > 1 else a
               for a in tensors]
    torch.library.opcheck(getattr(torch.ops.dat_lab, op).default, tuple(tensors))


@needs_kernels
def test_bad_inputs_are_refused():
    table, query_grid, pos = _case(4, 4, 4, 4, 6, 3, 1, 0.0)
    with pytest.raises(ValueError, match=r"groups 4 must divide the table's heads \(6\)"):
        cpu_kernels.relative_bias(table, *axes(query_grid), pos, groups=4)
    with pytest.raises(ValueError, match=r"positions \(N, Hk, Wk, 2\) expected; got .*\(3, 16, 2\)"):
        cpu_kernels.relative_bias(table, *axes(query_grid), pos.reshape(3, 16, 2), groups=3)
    x = torch.randn(1, 4, 4, 12)
    with pytest.raises(ValueError, match=r"positions \(B\*groups, Hk, Wk, 2\) expected; got \(1, 4, 4, 12\) and \(3, 4, 4, 2\)"):
        cpu_kernels.sample_keys(x, pos, groups=2)  # 2 groups: positions for 1 image would be (2, ...)
    with pytest.raises(ValueError, match="C divisible by groups 5"):
        cpu_kernels.sample_keys(x, pos, groups=5)
    with pytest.raises(ValueError, match=r"x \(B, C, H, W\) and weight \(C, 1, k, k\) expected; got "
                                         r"\(1, 12, 4, 4\) and \(12, 1, 3, 2\)"):
        cpu_kernels.depthwise_conv(x.permute(0, 3, 1, 2), torch.randn(12, 1, 3, 2), stride=1, padding=1)
    with pytest.raises(ValueError, match="^sampler 'native': the C kernels take float32 tensors on the CPU, not "
                                         "torch.float64 on cpu; use sampler 'auto'$"):
        cpu_kernels.sample_keys(x.double(), pos.double(), groups=3)


@needs_kernels
def test_the_build_is_cached_and_whole(tmp_path, monkeypatch):
    """A build writes one library into $DAT_LAB_CACHE (no leftovers); the next process reuses it."""
    monkeypatch.setenv("DAT_LAB_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "_state", {})
    assert cpu_kernels.available()
    built = sorted(p.name for p in tmp_path.iterdir())  # two where the OpenMP build could not load
    assert 1 <= len(built) <= 2 and all(n.startswith("cpu_kernels-") and n.endswith(".so") for n in built), built
    stamp = (tmp_path / built[0]).stat().st_mtime_ns
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setattr(cpu_kernels, "_compile", lambda *a: pytest.fail("compiled again"))
    assert cpu_kernels.available() and (tmp_path / built[0]).stat().st_mtime_ns == stamp


@needs_kernels
def test_where_the_openmp_build_cannot_load_the_serial_one_runs(tmp_path, monkeypatch):
    """(A torch without a GNU-compatible OpenMP runtime loaded leaves GOMP_parallel unresolved.)"""
    monkeypatch.setenv("DAT_LAB_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "_state", {})
    load = ctypes.CDLL
    tries = []

    def without_openmp(path, *args, **kwargs):
        tries.append(path)
        if len(tries) == 1:
            raise OSError(f"{path}: undefined symbol: GOMP_parallel")
        return load(path, *args, **kwargs)

    monkeypatch.setattr(cpu_kernels.ctypes, "CDLL", without_openmp)
    assert cpu_kernels.available() and cpu_kernels._state["variant"] == "serial" and len(tries) == 2
    monkeypatch.setattr(cpu_kernels.ctypes, "CDLL", load)
    table, query_grid, pos = _case(5, 5, 5, 5, 6, 3, 2, 0.3)
    assert_close(cpu_kernels.relative_bias(table, *axes(query_grid), pos, groups=3),
                 grid_sample_bias(table, query_grid, pos, 3), "bias")


def test_without_a_compiler_auto_falls_back_and_native_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("DAT_LAB_CACHE", str(tmp_path))  # nothing built there yet
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setattr(cpu_kernels, "_compiler", lambda: None)
    torch.manual_seed(0)
    model = dat_lab.create_model("dat_pico").eval()
    x = torch.randn(1, 3, 32, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallback = model(x)
        model(x)
    messages = [str(w.message) for w in caught if "dat-lab" in str(w.message)]
    assert messages == ["dat-lab: the CPU kernels could not be built: no C compiler found (set CC, or "
                        "install gcc or clang); deformable blocks use PyTorch's own ops instead"]  # once
    torch.testing.assert_close(fallback, set_deformable_options(model, sampler="grid_sample")(x), atol=0, rtol=0)
    set_deformable_options(model, sampler="native")
    with pytest.raises(RuntimeError, match="^sampler 'native': the CPU kernels could not be built: no C "
                                           "compiler found .*; use sampler 'auto' or 'grid_sample'$"):
        model(x)
