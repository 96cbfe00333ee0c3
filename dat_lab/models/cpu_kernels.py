"""Three parts of DAT's deformable attention as small C kernels for the CPU (cpu_kernels.c): the
relative position bias of deformed keys (the CPU's counterpart of `triton_bias`) and the bilinear
sampling of keys and values, forward and backward, and the weight gradient of the offset network's
depthwise convolution. The plain ops (grid_sample, conv2d) stay the fallback and the reference.

- The bias: grid_sample reads the (heads, 2H-1, 2W-1) table at half the query-key displacement
  (`DeformableAttention._bias`): it needs the (N, HW, Ns, 2) displacement grid, and its backward
  scatters every point's gradient into the small table one head at a time, then sums the grid's
  gradient over the queries; on a 2-core CPU that backward was about a fifth of the deformable block.
  The kernels compute the bias from the query axes and the sampling positions (no grid), the heads of
  a group side by side in 4-wide vectors: one bilinear read, and one scatter, serves four heads. Each
  thread adds the table gradient of its images into its own buffer (no atomics; deterministic for a
  given thread count).
- The keys: grid_sample wants x channel-first per group, so the channels-last block copied x there
  and the samples back. The kernels read and write channels-last (B, H, W, C) and (B, Ns, C) as they
  lie, a point's channels in one vectorised loop; in the backward each (image, group) writes only its
  own channels of the input gradient, so threads never meet.

The C source is compiled on first use with the machine's C compiler (`$CC`, Python's, `cc`, `gcc` or
`clang`), into `$DAT_LAB_CACHE` (default `$XDG_CACHE_HOME/dat-lab` or `~/.cache/dat-lab`; if that
cannot be made, a folder of this user's in the temporary folder), once per source, compiler and
flags, with OpenMP but linked without a runtime of its own, so that its loops run on the OpenMP
threads torch has loaded (a second pool would fight torch's for the cores). Where that library
cannot load (no such runtime loaded), a build without OpenMP runs on one thread (`_state["variant"]`
says which). It is loaded with ctypes. `available()` says whether it built; the deformable blocks'
sampler "auto" uses the kernels on the CPU for float32 operands when it did, PyTorch's own ops
otherwise (with one warning when the build failed).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .triton_bias import check_operands, operands, sizes

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ("-O3", "-fPIC", "-std=gnu11")

CPU32 = {"dtype": torch.float32, "device": "cpu"}  # what the kernels read and write (whatever torch's defaults)

_lock = threading.Lock()
_state: dict = {}  # "library" (CDLL) and "variant" ("openmp" or "serial"), or "error" (str); "warned"


def _compiler() -> list[str] | None:
    """The first C compiler found: $CC, the one Python was built with, cc, gcc, clang."""
    for candidate in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(shlex.split(candidate)[0]):
            return shlex.split(candidate)
    return None


def _cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dat-lab"
    return Path(os.environ.get("DAT_LAB_CACHE") or default)


def _build() -> ctypes.CDLL:
    """Compile cpu_kernels.c (once per source, compiler, flags and platform) and load it: with OpenMP
    (the runtime torch has loaded), or else serial."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc or clang)")
    try:
        directory = _cache_dir()
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        directory = _private_temp_dir()
    failures = []
    for variant, extra in (("openmp", ["-fopenmp"]), ("serial", [])):
        flags = [*FLAGS, *extra]
        key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), " ".join(cc + flags).encode(), sys.platform.encode(),
                                         platform.machine().encode()])).hexdigest()[:16]
        target = directory / f"cpu_kernels-{key}.so"
        try:
            if not target.exists():
                _compile(cc, flags, target)
            library = ctypes.CDLL(str(target))
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            failures.append(_first_error(str(e)) or type(e).__name__)
            continue
        P, L = ctypes.c_void_p, ctypes.c_long
        library.dat_bias_forward.argtypes = [P] * 5 + [L] * 9
        library.dat_bias_backward.argtypes = [P] * 7 + [L] * 9
        library.dat_keys_forward.argtypes = [P] * 3 + [L] * 7
        library.dat_keys_backward.argtypes = [P] * 5 + [L] * 7
        library.dat_dwconv_weight_grad.argtypes = [P] * 3 + [L] * 10
        for fn in (library.dat_bias_forward, library.dat_bias_backward, library.dat_keys_forward,
                   library.dat_keys_backward, library.dat_dwconv_weight_grad):
            fn.restype = ctypes.c_int
        _state["variant"] = variant
        return library
    raise RuntimeError("; ".join(failures))


def _private_temp_dir() -> Path:
    """A cache directory in the temporary folder that only this user can write (else a fresh one)."""
    uid = os.getuid() if hasattr(os, "getuid") else None
    directory = Path(tempfile.gettempdir()) / f"dat-lab-{uid}"
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
        if uid is not None and directory.stat().st_uid == uid and not directory.stat().st_mode & 0o022:
            return directory
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="dat-lab-"))


def _first_error(text: str) -> str:
    """The line of a compiler's output that says what went wrong (its first "error"), else its last line."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return next((line for line in lines if "error" in line.lower()), lines[-1] if lines else "")


def _compile(cc: list[str], flags: list[str], target: Path) -> None:
    """Object file with `flags`, then the shared library linked without them (so without an OpenMP
    runtime of its own); built beside the target and renamed, so that workers building at once each
    see a whole file."""
    stem = target.parent / f"{target.name}.{os.getpid()}.{threading.get_ident()}"
    steps = ([*cc, *flags, "-c", str(SOURCE), "-o", f"{stem}.o"],
             [*cc, "-shared", "-o", f"{stem}.tmp", f"{stem}.o", "-lm"])
    try:
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True, errors="replace", timeout=300)
            if done.returncode:
                raise RuntimeError(f"{' '.join(step[:2])}...: {(done.stderr or done.stdout).strip()}")
        os.replace(f"{stem}.tmp", target)
    finally:
        for suffix in (".o", ".tmp"):
            Path(f"{stem}{suffix}").unlink(missing_ok=True)


def _library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first call; None (and the reason in _state["error"]) if not."""
    with _lock:
        if "library" not in _state and "error" not in _state:
            try:
                _state["library"] = _build()
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                _state["error"] = f"the CPU kernels could not be built: {e}"
        return _state.get("library")


@torch.compiler.assume_constant_result  # torch.compile: called once while tracing, not traced
def available() -> bool:
    """Whether the kernels are built (building them now if need be; a build that failed is reported
    once, as a warning)."""
    if _library() is not None:
        return True
    if not _state.get("warned"):
        _state["warned"] = True
        warnings.warn(f"dat-lab: {_state['error']}; deformable blocks use PyTorch's own ops instead", stacklevel=2)
    return False


def supported(*tensors: Tensor) -> bool:
    """Whether sampler "auto" should use the kernels on these operands: all on the CPU, and a built library."""
    return all(t.device.type == "cpu" for t in tensors) and available()


def _threads(n: int) -> int:
    """Threads for n pieces of work (image-groups, channels): torch's thread count, at most n."""
    return max(1, min(n, torch.get_num_threads()))


def _check(failed: int) -> None:
    if failed:
        raise MemoryError("the CPU kernels of dat-lab ran out of memory")


@torch.library.custom_op("dat_lab::relative_bias_cpu", mutates_args=())
def _bias_forward(table: Tensor, qy: Tensor, qx: Tensor, pos: Tensor, groups: int) -> Tensor:
    """The float32 bias (N*m, H*W, Ns)."""
    M, Ht, Wt, N, Ns, H, W, m = sizes(table, qy, qx, pos, groups)
    table, qy, qx, pos = operands(table, qy, qx, pos)
    out = torch.empty(N * m, H * W, Ns, **CPU32)
    _check(_library().dat_bias_forward(table.data_ptr(), qy.data_ptr(), qx.data_ptr(), pos.data_ptr(), out.data_ptr(),
                                       N, _threads(N), groups, m, H, W, Ns, Ht, Wt))
    return out


@_bias_forward.register_fake
def _(table: Tensor, qy: Tensor, qx: Tensor, pos: Tensor, groups: int) -> Tensor:
    M, Ht, Wt, N, Ns, H, W, m = sizes(table, qy, qx, pos, groups)
    return pos.new_empty(N * m, H * W, Ns, dtype=torch.float32)


@torch.library.custom_op("dat_lab::relative_bias_cpu_backward", mutates_args=())
def _bias_backward(grad: Tensor, table: Tensor, qy: Tensor, qx: Tensor, pos: Tensor,
                   groups: int) -> tuple[Tensor, Tensor]:
    """Gradients of the table (M, Ht, Wt) and the positions (N, Hk, Wk, 2) from the bias's (N*m, HW, Ns)."""
    M, Ht, Wt, N, Ns, H, W, m = sizes(table, qy, qx, pos, groups)
    dtypes = table.dtype, pos.dtype
    table, qy, qx, pos = operands(table, qy, qx, pos)
    (grad,) = operands(grad)
    threads = _threads(N)
    table_part = torch.zeros(threads, M, Ht, Wt, **CPU32)  # one per thread, summed after
    pos_grad = torch.empty(pos.shape, **CPU32)
    _check(_library().dat_bias_backward(table.data_ptr(), qy.data_ptr(), qx.data_ptr(), pos.data_ptr(), grad.data_ptr(),
                                        table_part.data_ptr(), pos_grad.data_ptr(), N, threads, groups, m, H, W, Ns,
                                        Ht, Wt))
    return table_part.sum(0).to(dtypes[0]), pos_grad.to(dtypes[1])


@_bias_backward.register_fake
def _(grad: Tensor, table: Tensor, qy: Tensor, qx: Tensor, pos: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    return table.new_empty(table.shape), pos.new_empty(pos.shape)


def _save(ctx, inputs: tuple, output: Tensor) -> None:
    """Keep table, query axes and positions for the backward."""
    table, qy, qx, pos, ctx.groups = inputs
    ctx.save_for_backward(table, qy, qx, pos)


def _backward(ctx, grad: Tensor) -> tuple:
    """Gradients of table and positions (the axes and groups have none)."""
    if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[3]):
        return None, None, None, None, None
    table_grad, pos_grad = _bias_backward(grad, *ctx.saved_tensors, ctx.groups)
    return table_grad, None, None, pos_grad, None


_bias_forward.register_autograd(_backward, setup_context=_save)


def _ready(*operands: Tensor) -> None:
    """One-line errors for sampler "native" where the kernels cannot run."""
    for t in operands:
        if t.device.type != "cpu" or t.dtype != torch.float32:
            raise ValueError(f"sampler 'native': the C kernels take float32 tensors on the CPU, not {t.dtype} on "
                             f"{t.device.type}; use sampler 'auto'")
    if not available():
        raise RuntimeError(f"sampler 'native': {_state['error']}; use sampler 'auto' or 'grid_sample'")


def relative_bias(table: Tensor, query_y: Tensor, query_x: Tensor, positions: Tensor, *, groups: int) -> Tensor:
    """As `triton_bias.relative_bias`, on the CPU and in float32: the (heads, Ht, Wt) table read
    bilinearly at half of query - key, (N * heads/groups, H*W, Hk*Wk), as grid_sample(align_corners=True)
    gives."""
    _ready(table, query_x, query_y, positions)
    check_operands(table, query_y, query_x, positions, groups)
    return _bias_forward(table, query_y, query_x, positions, groups)


@torch.library.custom_op("dat_lab::sample_keys_cpu", mutates_args=())
def _keys_forward(x: Tensor, pos: Tensor, groups: int) -> Tensor:
    """Samples (B, Ns, C) in float32."""
    B, H, W, C = x.shape
    x, pos = operands(x, pos)
    out = torch.empty(B, pos.shape[1] * pos.shape[2], C, **CPU32)
    _check(_library().dat_keys_forward(x.data_ptr(), pos.data_ptr(), out.data_ptr(), B, groups, H, W, C, out.shape[1],
                                       _threads(B * groups)))
    return out


@_keys_forward.register_fake
def _(x: Tensor, pos: Tensor, groups: int) -> Tensor:
    return x.new_empty(x.shape[0], pos.shape[1] * pos.shape[2], x.shape[3], dtype=torch.float32)


@torch.library.custom_op("dat_lab::sample_keys_cpu_backward", mutates_args=())
def _keys_backward(grad: Tensor, x: Tensor, pos: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """Gradients of x (B, H, W, C) and the positions (B*G, Hk, Wk, 2) from the samples' (B, Ns, C)."""
    B, H, W, C = x.shape
    dtypes = x.dtype, pos.dtype
    x, pos, grad = operands(x, pos, grad)
    x_grad, pos_grad = torch.zeros(x.shape, **CPU32), torch.empty(pos.shape, **CPU32)
    _check(_library().dat_keys_backward(x.data_ptr(), pos.data_ptr(), grad.data_ptr(), x_grad.data_ptr(),
                                        pos_grad.data_ptr(), B, groups, H, W, C, grad.shape[1],
                                        _threads(B * groups)))
    return x_grad.to(dtypes[0]), pos_grad.to(dtypes[1])


@_keys_backward.register_fake
def _(grad: Tensor, x: Tensor, pos: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape), pos.new_empty(pos.shape)


def _save_keys(ctx, inputs: tuple, output: Tensor) -> None:
    x, pos, ctx.groups = inputs
    ctx.save_for_backward(x, pos)


def _keys_gradients(ctx, grad: Tensor) -> tuple:
    if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
        return None, None, None
    return (*_keys_backward(grad, *ctx.saved_tensors, ctx.groups), None)


_keys_forward.register_autograd(_keys_gradients, setup_context=_save_keys)


def sample_keys(x: Tensor, positions: Tensor, *, groups: int) -> Tensor:
    """x (B, H, W, C) (channels-last) sampled bilinearly, group g's C/groups channels at positions
    (B*groups, Hk, Wk, 2) ((y, x), normalised) of group g: (B, Hk*Wk, C) in float32, as
    grid_sample(align_corners=True, padding_mode="zeros") gives."""
    _ready(x, positions)
    if x.dim() != 4 or positions.dim() != 4 or positions.shape[-1] != 2 or x.shape[-1] % groups \
            or positions.shape[0] != x.shape[0] * groups:
        raise ValueError(f"sample_keys: x (B, H, W, C) with C divisible by groups {groups}, and positions "
                         f"(B*groups, Hk, Wk, 2) expected; got {tuple(x.shape)} and {tuple(positions.shape)}")
    return _keys_forward(x, positions, groups)


@torch.library.custom_op("dat_lab::depthwise_conv_cpu", mutates_args=())
def _dwconv(x: Tensor, weight: Tensor, stride: int, padding: int) -> Tensor:
    """F.conv2d(x, weight, groups=C) (oneDNN's forward), in float32 under autocast too; the backward below."""
    with torch.autocast("cpu", enabled=False):
        return F.conv2d(x, weight, stride=stride, padding=padding, groups=x.shape[1])


@_dwconv.register_fake
def _(x: Tensor, weight: Tensor, stride: int, padding: int) -> Tensor:
    return F.conv2d(x, weight, stride=stride, padding=padding, groups=x.shape[1])


@torch.library.custom_op("dat_lab::depthwise_conv_weight_grad_cpu", mutates_args=())
def _dwconv_weight_grad(x: Tensor, grad: Tensor, size: int, stride: int, padding: int) -> Tensor:
    """The (C, 1, k, k) weight gradient from x (B, C, H, W) and grad (B, C, Ho, Wo), read channels-last."""
    B, C, H, W = x.shape
    Ho, Wo = grad.shape[-2:]
    x, grad = (t.float().permute(0, 2, 3, 1).contiguous() for t in (x, grad))  # no copy when channels-last already
    out = torch.empty(C, 1, size, size, **CPU32)
    _check(_library().dat_dwconv_weight_grad(x.data_ptr(), grad.data_ptr(), out.data_ptr(), B, H, W, C, Ho, Wo, size,
                                             stride, padding, _threads(C)))
    return out


@_dwconv_weight_grad.register_fake
def _(x: Tensor, grad: Tensor, size: int, stride: int, padding: int) -> Tensor:
    return x.new_empty(x.shape[1], 1, size, size)


def _save_dwconv(ctx, inputs: tuple, output: Tensor) -> None:
    x, weight, ctx.stride, ctx.padding = inputs
    ctx.save_for_backward(x, weight)


def _dwconv_gradients(ctx, grad: Tensor) -> tuple:
    """The input's gradient by oneDNN (fast), the weight's by the C kernel (oneDNN's is several times slower)."""
    x, weight = ctx.saved_tensors
    s, p = ctx.stride, ctx.padding
    x_grad = w_grad = None
    if ctx.needs_input_grad[0]:
        x_grad = torch.ops.aten.convolution_backward(grad, x, weight, None, [s, s], [p, p], [1, 1], False, [0, 0],
                                                     x.shape[1], [True, False, False])[0]
    if ctx.needs_input_grad[1]:
        w_grad = _dwconv_weight_grad(x, grad, weight.shape[-1], s, p)
    return x_grad, w_grad, None, None


_dwconv.register_autograd(_dwconv_gradients, setup_context=_save_dwconv)


def depthwise_conv(x: Tensor, weight: Tensor, *, stride: int, padding: int) -> Tensor:
    """F.conv2d(x, weight, stride, padding, groups=C) for float32 x (B, C, H, W) (best channels-last in
    memory) and weight (C, 1, k, k), square kernel, stride and padding, with the weight's gradient
    by the C kernel."""
    _ready(x, weight)
    if x.dim() != 4 or weight.shape[0] != x.shape[1] or weight.shape[1] != 1 or weight.shape[-1] != weight.shape[-2]:
        raise ValueError(f"depthwise_conv: x (B, C, H, W) and weight (C, 1, k, k) expected; got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    return _dwconv(x, weight, stride, padding)
