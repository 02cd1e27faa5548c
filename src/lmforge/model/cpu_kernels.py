"""lmforge's own CPU kernels (`rmsnorm.c`), compiled on first use with the system's C compiler.

The library is built once per machine and source into the kernel cache
(`$LMFORGE_KERNEL_CACHE_DIR`, else `kernels/` in lmforge's cache folder; ~0.3 s) and loaded with
ctypes. Without a C compiler, with `LMFORGE_CPU_KERNELS=0`, or for a dtype the kernels do not
handle, callers fall back to PyTorch ops: slower, the same results within fp32 rounding.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("rmsnorm.c")
# -march=native: built on the machine that runs it (the cache key names the CPU); -fopenmp links
# libgomp.so.1, which resolves to the copy PyTorch's CPU build already loaded: one thread pool
FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c11", "-shared", "-fPIC")
KERNEL_DTYPES = (torch.float32, torch.bfloat16)
MAX_WIDTH = 16384  # each thread copies the weight into an fp32 row of this many
PARALLEL_MIN_ELEMENTS = 32768  # below this, one thread: waking the others costs more than it saves


def enabled() -> bool:
    """Whether the compiled kernels may be used (`LMFORGE_CPU_KERNELS=0` turns them off)."""
    return os.environ.get("LMFORGE_CPU_KERNELS", "1") != "0"


def kernel_cache_dir() -> Path:
    """Where built kernels are kept: `$LMFORGE_KERNEL_CACHE_DIR`, else lmforge's cache folder."""
    if value := os.environ.get("LMFORGE_KERNEL_CACHE_DIR"):
        return Path(value)
    from lmforge.files import cache_dir

    return cache_dir() / "kernels"


def _cpu_flags() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("flags"):
                return line
    return platform.processor()


def _compiler() -> list[str] | None:
    """The C compiler's command: `$CC` split as a shell splits it (`ccache gcc`), else cc, gcc or
    clang; None if there is none. A `$CC` with unbalanced quotes raises ValueError."""
    if value := os.environ.get("CC", "").strip():
        return shlex.split(value)
    found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return [found] if found else None


def _build(compiler: list[str], target: Path) -> None:
    """Compile SOURCE into `target`, atomically: processes, and threads of one process (the cache
    of `library` holds none back while another builds), each rename their own partial file."""
    target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)  # not group-writable: `_check_private`
    partial = target.with_name(f"{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    command = [*compiler, *FLAGS, str(SOURCE), "-o", str(partial), "-lm"]
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=300)
        partial.chmod(0o755)  # whatever the umask: `_check_private`
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)


def _check_private(target: Path) -> None:
    """Raise PermissionError unless `target` and its folder are this user's and no one else may write
    them: a library another user could put there would run their code in this process."""
    for path in (target.parent, target):
        status = path.stat()
        if status.st_uid != os.getuid() or status.st_mode & 0o022:
            raise PermissionError(f"{path} is not private to this user (another may write it): not loaded")


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, built if the cache lacks them; None where they cannot be: no C
    compiler, not Linux, or a failed build (warned once)."""
    if platform.system() != "Linux":
        return None
    try:
        compiler = _compiler()
        if compiler is None:
            return None
        key = hashlib.sha256(
            b"\0".join([SOURCE.read_bytes(), shlex.join([*compiler, *FLAGS]).encode(), _cpu_flags().encode()])
        )
        target = kernel_cache_dir() / f"rmsnorm-{key.hexdigest()[:16]}.so"
        if not target.is_file():
            _build(compiler, target)
        _check_private(target)
        lib = ctypes.CDLL(str(target))
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", None) or str(e)
        logger.warning(
            f"the CPU RMSNorm kernel did not build or load, PyTorch ops instead: {detail.strip()[:300]}"
        )
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    layout = [ctypes.c_int, i64, i64, i64, i64, i64]
    lib.lmforge_rms_norm_forward.argtypes = [
        *layout,
        ptr,
        ctypes.c_int,
        ptr,
        ctypes.c_int,
        ctypes.c_float,
        ptr,
        ptr,
    ]
    lib.lmforge_rms_norm_backward.argtypes = [
        *layout,
        ptr,
        ctypes.c_int,
        ptr,
        ctypes.c_int,
        ptr,
        ptr,
        ptr,
        ptr,
    ]
    lib.lmforge_rms_norm_forward.restype = lib.lmforge_rms_norm_backward.restype = ctypes.c_int
    return lib


def row_layout(x: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(rows, inner, outer_stride, inner_stride) such that row r of x starts at element
    (r // inner) * outer_stride + (r % inner) * inner_stride of its storage offset, when its last
    dimension is contiguous and its leading ones fold into two strided dimensions (a contiguous
    tensor, a head view of a fused qkv output); None otherwise."""
    if x.dim() == 0 or x.stride(-1) != 1:
        return None
    folded: list[list[int]] = []  # [size, stride], outermost first
    for size, stride in zip(x.shape[:-1], x.stride()[:-1]):
        if size == 1:
            continue
        if folded and folded[-1][1] == size * stride:
            folded[-1] = [folded[-1][0] * size, stride]
        else:
            folded.append([size, stride])
    if len(folded) > 2:
        return None
    (outer, outer_stride), (inner, inner_stride) = ([[1, 0]] * (2 - len(folded))) + folded
    return outer * inner, inner, outer_stride, inner_stride


def rms_norm_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the compiled kernel computes this RMSNorm (then `library()` is loaded)."""
    return (
        enabled()
        and x.is_cpu
        and weight.is_cpu
        and x.dtype in KERNEL_DTYPES
        and weight.dtype in KERNEL_DTYPES
        and weight.is_contiguous()
        and weight.shape == x.shape[-1:]  # the kernel reads d weights: fewer would read past them
        and 0 < x.shape[-1] <= MAX_WIDTH
        and library() is not None
    )


def _threads(x: torch.Tensor) -> int:
    if x.numel() < PARALLEL_MIN_ELEMENTS or not one_openmp_runtime():
        return 1
    return torch.get_num_threads()


@functools.cache
def one_openmp_runtime() -> bool:
    """Whether the kernels' OpenMP threads are PyTorch's own: only one OpenMP runtime is mapped into
    the process. With two (a PyTorch built with Intel's or LLVM's), each pool's threads would spin
    on the cores the other's need, so the kernels run on the calling thread alone."""
    try:
        maps = Path("/proc/self/maps").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    names = ("libgomp", "libiomp", "libomp")
    runtimes = {
        line.split()[-1] for line in maps.splitlines() if any(n in line.rsplit("/", 1)[-1] for n in names)
    }
    return len(runtimes) <= 1


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, ...]:
    """(y, rstd, x): RMSNorm of x, 1 / rms per row (fp32, shaped (..., 1)), and the x the kernel
    read (x itself, or a contiguous copy of a layout it cannot address), for the backward."""
    layout = row_layout(x)
    if layout is None:
        x = x.contiguous()
        layout = row_layout(x)
    assert layout is not None
    y = torch.empty(x.shape, dtype=x.dtype)
    rstd = torch.empty(*x.shape[:-1], 1, dtype=torch.float32)  # one per row, in row order
    failed = library().lmforge_rms_norm_forward(
        _threads(x), *layout, x.shape[-1],
        x.data_ptr(), x.dtype == torch.bfloat16, weight.data_ptr(), weight.dtype == torch.bfloat16,
        eps, y.data_ptr(), rstd.data_ptr(),
    )  # fmt: skip
    if failed:
        raise MemoryError("the CPU RMSNorm kernel could not allocate its weight row")
    return y, rstd, x


def rms_norm_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    rstd: torch.Tensor,
    wanted: tuple[bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dx, dweight) for the upstream `grad` of `rms_norm_forward`'s output, from the x it returned
    and its rstd; each only if `wanted`."""
    layout = row_layout(x)
    assert layout is not None
    grad = grad.to(x.dtype).contiguous()
    threads = _threads(x)
    dx = torch.empty(x.shape, dtype=x.dtype) if wanted[0] else None
    dweight = torch.zeros(threads, x.shape[-1], dtype=torch.float32) if wanted[1] else None
    failed = library().lmforge_rms_norm_backward(
        threads, *layout, x.shape[-1],
        x.data_ptr(), x.dtype == torch.bfloat16, weight.data_ptr(), weight.dtype == torch.bfloat16,
        grad.data_ptr(), rstd.data_ptr(),
        None if dx is None else dx.data_ptr(), None if dweight is None else dweight.data_ptr(),
    )  # fmt: skip
    if failed:
        raise MemoryError("the CPU RMSNorm kernel could not allocate its weight row")
    return dx, None if dweight is None else dweight.sum(0).to(weight.dtype)
