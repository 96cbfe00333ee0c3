"""DAT's relative position bias for deformed keys on the CPU: two small C kernels (cpu_bias.c),
forward and backward, the CPU's counterpart of `triton_bias`.

The plain path reads the (heads, 2H-1, 2W-1) table with `grid_sample` at half the query-key
displacement (`DeformableAttention._bias`): it builds the (N, HW, Ns, 2) displacement grid, and its
backward scatters every point's gradient into the small table one head at a time, then sums the grid's
gradient over the queries. On a 2-core CPU that backward was about a fifth of the whole deformable
block. These kernels compute the bias straight from the query axes and the sampling positions (no
grid), with the heads of a group side by side in one 4-wide vector: one bilinear read, and one
scatter, serves four heads. The backward writes the table gradient of each thread's images into its
own buffer (no atomics: deterministic for a given thread count) and the position gradients whole.

The C source is compiled on first use with the machine's C compiler (`$CC`, Python's, `cc`, `gcc` or
`clang`), into `$DAT_LAB_CACHE` (default `~/.cache/dat-lab`), once per source and compiler; the
library is loaded with ctypes, which lets go of the GIL during a call, so a thread pool of
`torch.get_num_threads()` threads splits the images. `available()` says whether it built; the
deformable blocks' sampler "auto" uses the kernels on the CPU when it did, grid_sample otherwise.
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
from torch import Tensor

from .triton_bias import check_operands, operands, sizes

SOURCE = Path(__file__).with_name("cpu_bias.c")
FLAGS = ("-O3", "-fPIC", "-std=gnu11")

_lock = threading.Lock()
_state: dict = {}  # "library" (CDLL) or "error" (str), "warned"


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
    """Compile cpu_bias.c (once per source, compiler, flags and platform) and load it: with OpenMP
    (the runtime torch has loaded), or else serial."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc or clang)")
    try:
        directory = _cache_dir()
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        directory = Path(tempfile.gettempdir()) / "dat-lab"
        directory.mkdir(parents=True, exist_ok=True)
    failures = []
    for variant in (["-fopenmp"], []):
        flags = [*FLAGS, *variant]
        key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), " ".join(cc + flags).encode(), sys.platform.encode(),
                                         platform.machine().encode()])).hexdigest()[:16]
        target = directory / f"cpu_bias-{key}.so"
        try:
            if not target.exists():
                _compile(cc, flags, target)
            library = ctypes.CDLL(str(target))
        except (OSError, RuntimeError) as e:
            failures.append(str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
            continue
        P, L = ctypes.c_void_p, ctypes.c_long
        library.dat_bias_forward.argtypes = [P] * 5 + [L] * 9
        library.dat_bias_backward.argtypes = [P] * 7 + [L] * 9
        library.dat_bias_forward.restype = library.dat_bias_backward.restype = ctypes.c_int
        return library
    raise RuntimeError("; ".join(failures))


def _compile(cc: list[str], flags: list[str], target: Path) -> None:
    """Object file with `flags`, then the shared library linked without them (so without an OpenMP
    runtime of its own); built beside the target and renamed, so that workers building at once each
    see a whole file."""
    stem = target.parent / f"{target.name}.{os.getpid()}.{threading.get_ident()}"
    steps = ([*cc, *flags, "-c", str(SOURCE), "-o", f"{stem}.o"],
             [*cc, "-shared", "-o", f"{stem}.tmp", f"{stem}.o", "-lm"])
    try:
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True)
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
            except (OSError, RuntimeError) as e:
                _state["error"] = f"the CPU bias kernels could not be built: {e}"
        return _state.get("library")


@torch.compiler.assume_constant_result  # torch.compile: called once while tracing, not traced
def available() -> bool:
    """Whether the kernels are built (building them now if need be; a build that failed is reported
    once, as a warning)."""
    if _library() is not None:
        return True
    if not _state.get("warned"):
        _state["warned"] = True
        warnings.warn(f"dat-lab: {_state['error']}; deformable blocks use grid_sample instead", stacklevel=2)
    return False


def supported(table: Tensor, positions: Tensor) -> bool:
    """Whether sampler "auto" should use the kernels here: CPU tensors and a built library."""
    return positions.device.type == "cpu" and table.device.type == "cpu" and available()


def _threads(n: int) -> int:
    """Threads for n image-groups: torch's thread count, at most n."""
    return max(1, min(n, torch.get_num_threads()))


def _check(failed: int) -> None:
    if failed:
        raise MemoryError("the CPU bias kernels ran out of memory")


@torch.library.custom_op("dat_lab::relative_bias_cpu", mutates_args=())
def _bias_forward(table: Tensor, qy: Tensor, qx: Tensor, pos: Tensor, groups: int) -> Tensor:
    """The float32 bias (N*m, H*W, Ns)."""
    M, Ht, Wt, N, Ns, H, W, m = sizes(table, qy, qx, pos, groups)
    table, qy, qx, pos = operands(table, qy, qx, pos)
    out = torch.empty(N * m, H * W, Ns, dtype=torch.float32)
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
    grad = grad.float().contiguous()
    threads = _threads(N)
    table_part = torch.zeros(threads, M, Ht, Wt)  # one per thread, summed after
    pos_grad = torch.empty(pos.shape)
    _check(_library().dat_bias_backward(table.data_ptr(), qy.data_ptr(), qx.data_ptr(), pos.data_ptr(), grad.data_ptr(),
                                        table_part.data_ptr(), pos_grad.data_ptr(), N, threads, groups, m, H, W, Ns,
                                        Ht, Wt))
    return table_part.sum(0).to(dtypes[0]), pos_grad.to(dtypes[1])


@_bias_backward.register_fake
def _(grad: Tensor, table: Tensor, qy: Tensor, qx: Tensor, pos: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    return torch.empty_like(table), torch.empty_like(pos)


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


def relative_bias(table: Tensor, query_y: Tensor, query_x: Tensor, positions: Tensor, *, groups: int) -> Tensor:
    """As `triton_bias.relative_bias`, on the CPU and in float32: the (heads, Ht, Wt) table read
    bilinearly at half of query - key, (N * heads/groups, H*W, Hk*Wk), as grid_sample(align_corners=True)
    gives."""
    if positions.device.type != "cpu" or table.device.type != "cpu":
        raise ValueError(f"sampler 'native': the C kernels run on the CPU, not {positions.device.type}; "
                         "use sampler 'auto'")
    if not available():
        raise RuntimeError(f"sampler 'native': {_state['error']}; use sampler 'auto' or 'grid_sample'")
    check_operands(table, query_y, query_x, positions, groups)
    return _bias_forward(table, query_y, query_x, positions, groups)
