"""A test matrix over every registered variant and every ablation knob, plus the model API."""

import pytest
import timm
import timm.optim
from timm.layers import DropPath
import torch

import dat_lab
from dat_lab.models import VARIANTS

from bias_reference import assert_close

SMALL = 64  # every variant at a small input: the windows clamp and pad, position tables resize


def _check_forward_backward(model, size, in_chans=3, num_classes=None):
    x = torch.randn(2, in_chans, *((size, size) if isinstance(size, int) else size))
    logits = model(x)
    assert logits.shape == (2, num_classes or model.num_classes)
    assert torch.isfinite(logits).all()
    logits.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert not no_grad, f"parameters without gradient: {no_grad}"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant(name):
    # no drop path here: a block dropped for the whole batch would get no gradient
    model = timm.create_model(name, num_classes=7, drop_path_rate=0.0,
                              img_size=SMALL if name.startswith("dat_base") else None)
    _check_forward_backward(model, SMALL if VARIANTS[name].img_size > SMALL else VARIANTS[name].img_size, num_classes=7)


KNOBS = {
    "position_none": {"position": "none"},
    "position_fixed": {"position": "fixed"},
    "position_dwconv": {"position": "dwconv"},
    "position_log_cpb": {"position": "log_cpb"},
    "no_offsets": {"offsets": False},
    "s_zero": {"offset_range": 0.0},
    "unbounded": {"offset_range": -1.0},
    "r2": {"key_downsample": [1, 1, 2, 1]},
    "groups": {"groups": [1, 2, 1, 2]},
    "aligned": {"reference": "aligned"},
    "kernel5": {"offset_kernel": 5},
    "pvt": {"blocks": ["P", "P", "LD", "LD"], "sr_ratio": [4, 2, 1, 1]},
    "all_deformable": {"blocks": "LD", "key_downsample": [4, 2, 1, 1]},
    "swin": {"blocks": "LS"},
    "dwconv_mlp_conv_patches": {"mlp": "dwconv", "conv_patches": True},
    "dropouts": {"drop_rate": 0.1, "attn_drop_rate": 0.1},
    "grayscale": {"in_chans": 1, "num_classes": 3},
    "stem_dim": {"stem_dim": 8},
}


@pytest.mark.parametrize("knob", list(KNOBS))
def test_every_knob_on_dat_pico(knob):
    torch.manual_seed(0)
    model = dat_lab.create_model("dat_pico", **KNOBS[knob])
    torch.manual_seed(0)
    plain = dat_lab.create_model("dat_pico")
    shapes = [{k: v.shape for k, v in m.state_dict().items()} for m in (model, plain)]
    if shapes[0] == shapes[1]:  # the same weights: the knob must change what the network computes
        x = torch.randn(2, 3, 32, 32)
        outputs = []
        for m in (model, plain):
            torch.manual_seed(1)  # the same dropout and drop-path draws
            outputs.append(m.train()(x))
        assert not torch.allclose(*outputs), f"{knob} did not change the network"
    expected = {"in_chans": 3, "num_classes": 1000} | {k: v for k, v in KNOBS[knob].items() if k in ("in_chans", "num_classes")}
    _check_forward_backward(model, 32, **expected)


@pytest.mark.parametrize("size", [40, (32, 48), 36])
@pytest.mark.parametrize("position", ["relative", "fixed", "log_cpb"])
def test_any_input_size(size, position):
    """Sizes that do not divide the windows pad; position tables work at another resolution."""
    model = dat_lab.create_model("dat_pico", position=position, num_classes=5)
    _check_forward_backward(model, size)


def test_an_input_too_small_for_the_stages_is_refused_in_one_line():
    """16 pixels a side for dat_pico (patches of 4, then three halvings: one pixel at stage 4) runs; less
    is refused by the model, not by a convolution deep inside in its words."""
    model = dat_lab.create_model("dat_pico", num_classes=5)
    assert model.least_size == 16 and model(torch.randn(1, 3, 16, 40)).shape == (1, 5)
    with pytest.raises(ValueError, match=r"^input 15x40: too small for 4 stages \(at least 16 pixels a side\)$"):
        model(torch.randn(1, 3, 15, 40))


def test_drop_path_is_stochastic_in_training_only():
    model = dat_lab.create_model("dat_pico", drop_path_rate=0.5)
    x = torch.randn(4, 3, 32, 32)
    assert not torch.allclose(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x))


def test_drop_path_rates_rise_linearly_over_the_blocks():
    """DAT_SPEC: rates = linspace(0, drop_path_rate, sum(depths)), one per block in order, the block's
    two residual branches sharing it."""
    model = dat_lab.create_model("dat_tiny")
    rates = [m.drop_prob if isinstance(m, DropPath) else 0.0 for stage in model.stages for m in stage.drop_path]
    assert rates == pytest.approx(torch.linspace(0, 0.2, 12).tolist())
    assert [len(stage.drop_path) for stage in model.stages] == [2, 2, 6, 2]


def test_forward_intermediates():
    model = dat_lab.create_model("dat_pico", num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32)
    out = model.forward_intermediates(x, return_attention=True)
    torch.testing.assert_close(out["logits"], model(x))
    assert [f.shape[1:] for f in out["features"]] == [(16, 16, 16), (32, 8, 8), (64, 4, 4), (128, 2, 2)]
    assert list(out["deformable"]) == ["stages.2.attns.1", "stages.3.attns.1"]
    info = out["deformable"]["stages.2.attns.1"]
    assert info["positions"].shape == info["references"].shape == (2, 2, 4, 4, 2)
    assert info["attention"].shape == (2, 4, 16, 16)
    torch.testing.assert_close(info["attention"].sum(-1), torch.ones(2, 4, 16))
    assert "attention" not in model.forward_intermediates(x)["deformable"]["stages.2.attns.1"]


@pytest.mark.parametrize("knob", [{}, {"offsets": False}])
def test_sampling_records_are_copies(knob):
    """Reference points (and positions, without offsets) come from grids cached per shape: what the
    model hands out must be copies, or a caller's in-place edit would move every later forward's keys."""
    model = dat_lab.create_model("dat_pico", groups=[1, 1, 1, 1], **knob).eval()
    x = torch.randn(1, 3, 32, 32)  # batch x groups = 1: the expanded views would be writable
    info = model.forward_intermediates(x)["deformable"]["stages.2.attns.1"]
    expected, logits = info["references"].clone(), model(x)
    info["references"].add_(1.0)
    info["positions"].add_(1.0)
    again = model.forward_intermediates(x)
    torch.testing.assert_close(again["deformable"]["stages.2.attns.1"]["references"], expected)
    torch.testing.assert_close(again["logits"], logits)


def test_timm_registration():
    assert set(VARIANTS) <= set(timm.list_models("dat_*"))
    model = timm.create_model("dat_tiny", num_classes=10)
    assert model.cls_head.out_features == 10 and model.config.num_classes == 10
    with pytest.raises(ValueError, match="no hub weights"):
        timm.create_model("dat_pico", pretrained=True)


def test_create_model_overrides():
    model = dat_lab.create_model("dat_tiny", offset_range=4, groups=[1, 1, 6, 6], num_classes=3)
    assert [s.offset_range for s in model.config.stages] == [4, 4, 4, 4]
    assert [s.groups for s in model.config.stages] == [1, 1, 6, 6]
    with pytest.raises(ValueError, match="unknown config field.*offset_rnage"):
        dat_lab.create_model("dat_tiny", offset_rnage=4)
    with pytest.raises(ValueError, match="unknown model"):
        dat_lab.create_model("dat_huge")


def test_reset_classifier_and_no_weight_decay():
    model = dat_lab.create_model("dat_pico")
    model.reset_classifier(5)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5) and model.config.num_classes == 5
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 128)

    model = dat_lab.create_model("dat_pico", position=["none", "none", "relative", "dwconv"])
    optimizer = timm.optim.create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05)
    no_decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in no_decay}
    assert "stages.2.attns.1.rpe_table" in names  # a 3-D table, excluded only by the pattern
    assert "stages.3.attns.1.rpe_table.weight" in names
    assert "stages.0.attns.0.relative_position_bias_table" in names
    assert "stages.2.attns.1.proj_q.weight" not in names and "stages.2.mlps.0.chunk.linear1.weight" not in names


FAST_PATHS = {  # options of the fast deformable path (see set_deformable_options)
    "chunked": {"chunk_bytes": 0},  # one batch element at a time
    "whole": {"chunk_bytes": 2**40},
    "dense": {"sampler": "dense"},  # the deterministic sampling by interpolation matrices
    "grid_sample": {"sampler": "grid_sample"},  # the bias by grid_sample (on the CPU "auto" takes the C kernels)
    "sdpa": {"kernel": "sdpa"},
}


def _pass(model, x, *, return_attention):
    model.zero_grad()
    x.grad = None
    out = model.forward_intermediates(x, return_attention=return_attention)
    (out["logits"].square().sum() + out["features"][2].sum()).backward()
    return out, x.grad.clone(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("path", list(FAST_PATHS))
@pytest.mark.parametrize("knob", ["position_none", "position_fixed", "position_dwconv", "position_log_cpb",
                                  "no_offsets", "unbounded", "r2", "aligned"])
def test_fast_deformable_path_equals_the_reference(knob, path):
    """The fast formulation against the released one: outputs, attention and gradients to 1e-5 (float32)."""
    from dat_lab.models.attention import set_deformable_options

    torch.manual_seed(0)
    model = dat_lab.create_model("dat_pico", **KNOBS[knob]).eval()
    x = torch.randn(3, 3, 32, 32, requires_grad=True)
    ref, ref_x, ref_g = _pass(set_deformable_options(model, reference=True), x, return_attention=True)
    set_deformable_options(model, reference=False, **FAST_PATHS[path])
    fast, fast_x, fast_g = _pass(model, x, return_attention=False)
    assert_close(fast["logits"], ref["logits"], "logits")
    assert_close(fast_x, ref_x, "input gradient")
    for name in ref_g:
        assert_close(fast_g[name], ref_g[name], name)
    with torch.no_grad():
        attention = model.forward_intermediates(x, return_attention=True)["deformable"]
    assert attention.keys() == ref["deformable"].keys() and attention
    for name, info in attention.items():
        assert_close(info["attention"], ref["deformable"][name]["attention"], name)


def test_deformable_options_are_checked():
    from dat_lab.models.attention import set_deformable_options

    model = dat_lab.create_model("dat_pico")
    with pytest.raises(ValueError, match="sampler: 'gather' is not one of auto, grid_sample, dense"):
        set_deformable_options(model, sampler="gather")
    with pytest.raises(ValueError, match="^kernel: 'flash' is not one of auto, matmul, sdpa, triton$"):
        set_deformable_options(model, kernel="flash")


def test_automatic_choices_of_the_fast_path():
    from dat_lab.models.attention import dense_sampling, fused_kernel, native_sampling, triton_sampling

    assert triton_sampling("auto", "cuda") and not triton_sampling("auto", "cpu") and triton_sampling("triton", "cpu")
    assert native_sampling("auto", "cpu") and not native_sampling("auto", "cuda") and native_sampling("native", "cuda")
    assert not native_sampling("grid_sample", "cpu") and not native_sampling("dense", "cpu")
    assert not triton_sampling("grid_sample", "cuda") and not dense_sampling("triton", "cuda")
    assert fused_kernel("auto", "cuda") and not fused_kernel("auto", "cpu") and fused_kernel("sdpa", "cpu")
    assert not fused_kernel("matmul", "cuda")
    assert dense_sampling("dense", "cpu") and not dense_sampling("grid_sample", "cuda")
    assert not dense_sampling("auto", "cuda") and not dense_sampling("auto", "cpu")
    torch.use_deterministic_algorithms(True)
    try:
        assert dense_sampling("auto", "cuda") and not dense_sampling("auto", "cpu")
    finally:
        torch.use_deterministic_algorithms(False)


def test_cached_tables_survive_inference_mode_and_dtype_changes():
    model = dat_lab.create_model("dat_pico", blocks="LS")
    with torch.inference_mode():
        model(torch.randn(1, 3, 32, 32))
    model(torch.randn(1, 3, 32, 32)).sum().backward()  # the cached index and mask are plain tensors
    assert model.to(torch.bfloat16)(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_dense_sampling_runs_no_grid_sample_or_adaptive_pooling():
    """What makes training deterministic on CUDA: with the dense sampler, no op without a
    deterministic CUDA backward runs (grid_sample, adaptive pooling), forward or backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from dat_lab.models.attention import set_deformable_options

    class Ops(TorchDispatchMode):
        seen: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(func.__name__)
            return func(*args, **(kwargs or {}))

    model = dat_lab.create_model("dat_pico", blocks="LD", key_downsample=[4, 2, 1, 1])
    for sampler, expect in (("grid_sample", True), ("dense", False)):
        set_deformable_options(model, sampler=sampler)
        with Ops() as ops:
            model(torch.randn(2, 3, 32, 32)).sum().backward()
        assert any("grid_sampler" in name for name in ops.seen) is expect, sampler
        assert not any("adaptive" in name or "upsample" in name for name in ops.seen)
        ops.seen.clear()


def test_sampled_keys_are_cast_once_and_one_piece_is_not_split():
    """Under autocast the keys' samples (grid_sample's float32, a transposed view) are made token-major
    in bf16 by one copy, not a float32 copy and a cast for each of the k and v projections; attention
    in one piece splits nothing (a split's backward concatenates its gradients: copies)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from dat_lab.models.attention import DeformableAttention, set_deformable_options

    views = {"view", "_unsafe_view", "transpose", "permute", "expand", "alias", "detach", "t"}

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.samples, self.on_samples, self.names = [], [], []  # samples kept: their memory is not reused

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            self.names.append(name)
            first = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if first is not None and name not in views and any(
                    first.untyped_storage().data_ptr() == s.untyped_storage().data_ptr() for s in self.samples):
                self.on_samples.append(f"{name} -> {getattr(out, 'dtype', None)}")  # every op reading them but views
            if name == "grid_sampler_2d" and first is not None and first.dim() == 4 and first.shape[1] > 2:
                self.samples.append(out)  # the keys' samples, not a bias
            return out

    model = set_deformable_options(dat_lab.create_model("dat_pico", blocks="LD", position="none"),
                                   sampler="grid_sample", chunk_bytes=2**40)
    with Ops() as ops, torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 3, 32, 32)).float().sum().backward()
    blocks = sum(isinstance(m, DeformableAttention) for m in model.modules())
    assert ops.on_samples == ["_to_copy -> torch.bfloat16"] * blocks  # one per deformable block
    assert "split" not in ops.names and "cat" not in ops.names
    set_deformable_options(model, chunk_bytes=0)  # one image at a time: split, and concatenated back
    with Ops() as ops:
        model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert "split" in ops.names and "cat" in ops.names


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_deformable_attention_compiles_without_graph_breaks(autocast, monkeypatch):
    """torch.compile traces the whole model, deformable blocks included, as one graph, also under
    autocast as bf16 training runs it. The eager-only cast of the sampled keys asks autocast's state
    in a way torch 2.11's dynamo cannot trace (a graph break in every deformable block, seen on a GPU):
    here that query breaks the graph on any torch, so the compiled path must not reach it."""
    import torch._dynamo

    from dat_lab.models import attention

    def untraceable(x):
        torch._dynamo.graph_break()
        return x.dtype

    monkeypatch.setattr(attention, "_product_dtype", untraceable)
    torch._dynamo.reset()
    model = dat_lab.create_model("dat_pico").train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 32, 32))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
