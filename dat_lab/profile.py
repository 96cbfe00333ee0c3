"""Parameters and FLOPs of a model in the paper's convention (fvcore's, which the paper used).

One multiply-add is one FLOP. Counted: convolutions and matrix products (linear layers, einsum,
attention matmuls, fused scaled_dot_product_attention) without their bias adds; LayerNorm at 5 per
element (4 without affine); bilinear grid_sample and bilinear upsampling at 4 per output element;
adaptive average pooling (a mean) at 1 per input element. Not counted: activations, softmax, additions.
The count runs the model once under a dispatch mode, so it sees exactly the aten ops that run.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .models import cpu_kernels  # noqa: F401  (registers the torch.ops.dat_lab ops counted below)

aten = torch.ops.aten


def _shape(t: Any) -> list[int]:
    return list(t.shape)


def _mm(inputs, outputs) -> int:  # (n, k) @ (k, m)
    a, b = _shape(inputs[0]), _shape(inputs[1])
    return a[0] * a[1] * b[1]


def _addmm(inputs, outputs) -> int:
    a, b = _shape(inputs[1]), _shape(inputs[2])
    return a[0] * a[1] * b[1]


def _bmm(inputs, outputs) -> int:  # (b, n, k) @ (b, k, m)
    a, b = _shape(inputs[0]), _shape(inputs[1])
    return a[0] * a[1] * a[2] * b[2]


def _baddbmm(inputs, outputs) -> int:
    return _bmm(inputs[1:], outputs)


def _conv(inputs, outputs) -> int:  # out elements x (Cin / groups) x kernel
    weight = _shape(inputs[1])
    return math.prod(_shape(outputs)) * math.prod(weight[1:])


def _layer_norm(inputs, outputs) -> int:
    affine = len(inputs) > 2 and inputs[2] is not None
    return math.prod(_shape(inputs[0])) * (5 if affine else 4)


def _per_output(k: int):
    return lambda inputs, outputs: k * math.prod(_shape(outputs[0] if isinstance(outputs, (tuple, list)) else outputs))


def _per_input(inputs, outputs) -> int:
    return math.prod(_shape(inputs[0]))


def _sdpa(inputs, outputs) -> int:  # q (..., L, E) k (..., S, E) v (..., S, Ev)
    q, k, v = _shape(inputs[0]), _shape(inputs[1]), _shape(inputs[2])
    batch = math.prod(q[:-2])
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


_FORMULAS = {
    aten.mm.default: _mm,
    aten.addmm.default: _addmm,
    aten.bmm.default: _bmm,
    aten.baddbmm.default: _baddbmm,
    aten.convolution.default: _conv,
    aten.native_layer_norm.default: _layer_norm,
    aten.grid_sampler_2d.default: _per_output(4),
    aten.upsample_bilinear2d.default: _per_output(4),
    aten.upsample_bilinear2d.vec: _per_output(4),
    aten._adaptive_avg_pool2d.default: _per_input,
    aten.mean.dim: _per_input,  # adaptive_avg_pool2d(x, 1) runs as a mean
    aten._scaled_dot_product_flash_attention_for_cpu.default: _sdpa,
    aten._scaled_dot_product_efficient_attention.default: _sdpa,
    aten._scaled_dot_product_flash_attention.default: _sdpa,
    aten._scaled_dot_product_cudnn_attention.default: _sdpa,
    # the CPU's C kernels (dat_lab.models.cpu_kernels), counted as the ops they stand for
    torch.ops.dat_lab.relative_bias_cpu.default: _per_output(4),  # grid_sample of the bias
    torch.ops.dat_lab.sample_keys_cpu.default: _per_output(4),  # grid_sample of the keys
    torch.ops.dat_lab.depthwise_conv_cpu.default: _conv,
}


class FlopCounter(TorchDispatchMode):
    """Counts FLOPs (paper convention) of the aten ops run inside it, by op name."""

    def __init__(self) -> None:
        super().__init__()
        self.by_op: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        formula = _FORMULAS.get(func)
        if formula is not None:
            self.by_op[func.overloadpacket.__name__] += formula(args, out)
        return out

    @property
    def total(self) -> int:
        return sum(self.by_op.values())


def count_flops(model: nn.Module, img_size: int, in_chans: int = 3) -> int:
    """FLOPs of one forward pass of one image of img_size x img_size."""
    x = torch.zeros(1, in_chans, img_size, img_size)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounter() as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.total


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass(frozen=True)
class Profile:
    params_m: float
    gflops: float

    def shown(self) -> dict[str, float]:
        """`params_m` and `gflops` to 6 significant digits, as trials, dry runs and `dat-lab profile` give
        them (4 decimals made dat_pico's 0.007375 and 0.007416 GFLOPs both 0.0074)."""
        return {"params_m": float(f"{self.params_m:.6g}"), "gflops": float(f"{self.gflops:.6g}")}


def profile_model(model: nn.Module, img_size: int | None = None) -> Profile:
    """Params (millions) and GFLOPs of a DAT at img_size (default: its config's)."""
    size = img_size or model.config.img_size
    return Profile(params_m=count_params(model) / 1e6, gflops=count_flops(model, size, model.config.in_chans) / 1e9)
