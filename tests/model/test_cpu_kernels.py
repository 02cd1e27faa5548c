"""Building and loading lmforge's compiled CPU kernels (`lmforge.model.cpu_kernels`)."""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge.model import cpu_kernels
from lmforge.model.gpt import RMSNorm


@pytest.fixture
def fresh_library(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """`cpu_kernels.library()` built anew into an empty kernel cache, then forgotten again."""
    monkeypatch.setenv("LMFORGE_KERNEL_CACHE_DIR", str(tmp_path / "kernels"))
    cpu_kernels.library.cache_clear()
    yield tmp_path / "kernels"
    cpu_kernels.library.cache_clear()


def test_builds_once_into_the_kernel_cache(fresh_library) -> None:
    if cpu_kernels._compiler() is None:
        pytest.skip("no C compiler")
    assert cpu_kernels.library() is not None
    built = list(fresh_library.iterdir())
    assert [p.suffix for p in built] == [".so"]  # no partial file left behind
    cpu_kernels.library.cache_clear()
    modified = built[0].stat().st_mtime_ns
    assert cpu_kernels.library() is not None
    assert built[0].stat().st_mtime_ns == modified  # loaded from the cache, not rebuilt


def test_a_failing_compiler_warns_and_the_norm_falls_back(fresh_library, monkeypatch, caplog) -> None:
    monkeypatch.setenv("CC", "false")  # a compiler that exits 1
    with caplog.at_level("WARNING", logger="lmforge"):
        assert cpu_kernels.library() is None
    assert "the CPU RMSNorm kernel did not build" in caplog.text
    assert not fresh_library.exists() or not any(fresh_library.iterdir())
    norm, x = RMSNorm(16, eps=1e-5), torch.randn(3, 16, requires_grad=True)
    assert not cpu_kernels.rms_norm_usable(x, norm.weight)
    torch.testing.assert_close(norm(x), F.rms_norm(x, (16,), norm.weight, 1e-5))


def test_turned_off_by_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("LMFORGE_CPU_KERNELS", "0")
    assert not cpu_kernels.rms_norm_usable(torch.randn(2, 8), torch.ones(8))


def test_dtypes_the_kernel_does_not_handle_fall_back() -> None:
    weight = torch.ones(8)
    for dtype in (torch.float64, torch.float16):
        assert not cpu_kernels.rms_norm_usable(torch.randn(2, 8, dtype=dtype), weight)


def test_its_threads_are_pytorchs_own() -> None:
    # the library links libgomp.so.1 by soname: the loader hands it the copy PyTorch loaded, so the
    # process has one OpenMP runtime and the kernels may use all of torch's threads
    if cpu_kernels.library() is None:
        pytest.skip("no C compiler")
    assert cpu_kernels.one_openmp_runtime()


def test_a_weight_of_another_width_is_not_the_kernels() -> None:
    # the kernel reads one weight per channel of x: a shorter weight would be read past its end
    for weight in (torch.ones(8), torch.ones(32), torch.ones(1), torch.ones(2, 16)):
        assert not cpu_kernels.rms_norm_usable(torch.randn(2, 16), weight)
    # nor one off the CPU (a model built on the meta device): its data pointer is no CPU memory
    assert not cpu_kernels.rms_norm_usable(torch.randn(2, 16), torch.ones(16, device="meta"))


def test_threads_building_at_once_each_get_the_library(fresh_library, caplog) -> None:
    # functools.cache does not hold back a second caller while the first builds: threads of one
    # process (a server's) must not share a partial file, or one's rename takes the other's build
    if cpu_kernels._compiler() is None:
        pytest.skip("no C compiler")
    with caplog.at_level("WARNING", logger="lmforge"), ThreadPoolExecutor(4) as pool:
        libraries = list(pool.map(lambda _: cpu_kernels.library.__wrapped__(), range(4)))
    assert all(lib is not None for lib in libraries), caplog.text
    assert [p.suffix for p in fresh_library.iterdir()] == [".so"]


def test_a_compiler_command_with_arguments_builds_its_own_library(fresh_library, monkeypatch) -> None:
    # CC may be a command line (`ccache gcc`, `gcc -m64`), and the compiler is part of the cache key
    compiler = cpu_kernels._compiler()
    if compiler is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("CC", shlex.join(compiler))
    assert cpu_kernels.library() is not None
    cpu_kernels.library.cache_clear()
    monkeypatch.setenv("CC", shlex.join(["env", "LC_ALL=C", *compiler]))
    assert cpu_kernels.library() is not None
    assert len(list(fresh_library.iterdir())) == 2


SMALL_STACKS = """
import threading, torch
from lmforge.model import cpu_kernels
from lmforge.model.gpt import RMSNorm
assert cpu_kernels.library() is not None
torch.set_num_threads(2)
norm, x = RMSNorm(cpu_kernels.MAX_WIDTH), torch.randn(8, cpu_kernels.MAX_WIDTH, requires_grad=True)
def step():
    norm(x).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(norm.weight.grad).all()
threading.stack_size(64 * 1024)  # Python's own minimum is 32 KiB
thread = threading.Thread(target=step)
thread.start()
thread.join()
print("ok", norm.weight.grad.shape[0])
"""


def test_the_widest_rows_run_on_small_thread_stacks() -> None:
    # a 16384-wide fp32 row is 64 KiB: the kernel's threads, the calling one and OpenMP's, may have
    # stacks smaller than that (threading.stack_size, OMP_STACKSIZE); it crashed when it kept the row there
    if cpu_kernels.library() is None:
        pytest.skip("no C compiler")
    env = {**os.environ, "OMP_STACKSIZE": "16K", "PYTHONPATH": str(Path(cpu_kernels.__file__).parents[2])}
    done = subprocess.run(
        [sys.executable, "-c", SMALL_STACKS], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["ok", str(cpu_kernels.MAX_WIDTH)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_result_does_not_depend_on_its_address(dtype: torch.dtype) -> None:
    # the same row at any alignment gives the same bits (no loop peeled to align the vector loads,
    # which would regroup the sums): results are the same run to run, whatever the allocator returns
    if cpu_kernels.library() is None:
        pytest.skip("no C compiler")
    torch.manual_seed(0)
    width = 1003
    row, weight, grad = torch.randn(width).to(dtype), torch.randn(width), torch.randn(1, width).to(dtype)
    results = []
    for offset in range(17):
        x = torch.zeros(offset + width, dtype=dtype)[offset:].view(1, width)
        x.copy_(row)
        y, rstd, saved = cpu_kernels.rms_norm_forward(x, weight, 1e-5)
        results.append(
            (y, rstd, *cpu_kernels.rms_norm_backward(grad, saved, weight, rstd=rstd, wanted=(True, True)))
        )
    for result in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], result))


def test_a_library_others_may_write_is_not_loaded(fresh_library, caplog) -> None:
    # in a cache folder others can write (LMFORGE_KERNEL_CACHE_DIR=/tmp/...), a library with the
    # predictable name could be anyone's code: it is refused, with one warning, and the norm falls back
    if cpu_kernels._compiler() is None:
        pytest.skip("no C compiler")
    assert cpu_kernels.library() is not None
    assert stat.S_IMODE(fresh_library.stat().st_mode) & 0o022 == 0  # built private, whatever the umask
    (built,) = fresh_library.iterdir()
    for path, mode in ((fresh_library, 0o777), (built, 0o777)):
        original = stat.S_IMODE(path.stat().st_mode)
        path.chmod(mode)
        cpu_kernels.library.cache_clear()
        caplog.clear()
        with caplog.at_level("WARNING", logger="lmforge"):
            assert cpu_kernels.library() is None
        assert "not private to this user" in caplog.text
        path.chmod(original)
    cpu_kernels.library.cache_clear()
    assert cpu_kernels.library() is not None
