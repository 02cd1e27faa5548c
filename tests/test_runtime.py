"""Precision choice and the MFU denominator (`lmforge.runtime`)."""

import json
import os
from pathlib import Path

import pytest
import torch

from lmforge import runtime
from lmforge.errors import LmforgeError
from lmforge.runtime import (
    NATIVE_BF16_ENV,
    PEAK_CACHE_FILE,
    Peak,
    datasheet_kind,
    device_peak,
    machine_key,
    matmul_peak_flops,
    native_bf16,
    resolve_dtype,
)

CPU = torch.device("cpu")


def peak_cache() -> Path:
    """The peak cache of this test alone (tests/conftest.py gives each test its LMFORGE_CACHE_DIR)."""
    return Path(os.environ["LMFORGE_CACHE_DIR"]) / PEAK_CACHE_FILE


def test_native_bf16_needs_bf16_hardware_and_onednn_and_follows_the_override(monkeypatch) -> None:
    monkeypatch.delenv(NATIVE_BF16_ENV, raising=False)
    hardware = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert native_bf16(CPU) == (hardware and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    for forced, expected in [("0", False), ("1", True)]:
        monkeypatch.setenv(NATIVE_BF16_ENV, forced)
        assert native_bf16(CPU) is expected
    monkeypatch.setenv(NATIVE_BF16_ENV, "yes")
    with pytest.raises(LmforgeError, match=r"^LMFORGE_NATIVE_BF16 must be 0 or 1, got 'yes'$"):
        native_bf16(CPU)


def test_auto_is_bf16_only_where_native_and_emulated_bf16_warns_once(monkeypatch, capsys) -> None:
    monkeypatch.setattr(runtime, "_warned_emulated", set())
    monkeypatch.setenv(NATIVE_BF16_ENV, "1")
    assert resolve_dtype("auto", CPU) == "bf16" and resolve_dtype("bf16", CPU) == "bf16"
    assert capsys.readouterr().err == ""
    monkeypatch.setenv(NATIVE_BF16_ENV, "0")
    assert resolve_dtype("auto", CPU) == "fp32" and resolve_dtype("fp32", CPU) == "fp32"
    assert capsys.readouterr().err == ""
    assert resolve_dtype("bf16", CPU) == "bf16"  # still runs as asked
    assert resolve_dtype("bf16", CPU) == "bf16"
    err = capsys.readouterr().err
    assert err.count("warning: bf16 is emulated") == 1 and 'train.dtype = "auto"' in err


def test_peak_is_measured_once_and_never_in_emulated_bf16(monkeypatch) -> None:
    monkeypatch.setenv(NATIVE_BF16_ENV, "0")
    runtime._measured_peak.cache_clear()
    fp32 = matmul_peak_flops(CPU, "fp32")
    assert fp32 > 1e9
    assert matmul_peak_flops(CPU, "bf16") == fp32  # the fp32 measurement stands in
    assert runtime._measured_peak.cache_info().currsize == 1


def test_the_peak_is_the_best_ever_measured_on_this_machine_kind(monkeypatch) -> None:
    """A probe on a busy machine reads low: the cache keeps the best per processor, dtype and threads."""
    probes = iter([100e9, 40e9, 150e9, 30e9, 60e9])
    monkeypatch.setattr(runtime, "_measured_peak", lambda device, dtype: next(probes))
    monkeypatch.setattr(runtime, "processor_model", lambda: "Xeon A")
    monkeypatch.setenv(NATIVE_BF16_ENV, "1")
    assert matmul_peak_flops(CPU, "fp32") == 100e9  # first probe: nothing cached yet
    assert matmul_peak_flops(CPU, "fp32") == 100e9  # a busy 40 GFLOP/s probe does not lower it
    assert matmul_peak_flops(CPU, "fp32") == 150e9  # a better probe raises it
    assert matmul_peak_flops(CPU, "bf16") == 30e9  # another dtype is another entry
    monkeypatch.setattr(runtime, "processor_model", lambda: "Xeon B")
    assert matmul_peak_flops(CPU, "fp32") == 60e9  # another processor model: its own peak
    cached = json.loads((peak_cache()).read_text())
    threads = torch.get_num_threads()
    assert cached == {
        f"cpu Xeon A fp32 {threads} threads": 150e9,
        f"cpu Xeon A bf16 {threads} threads": 30e9,
        f"cpu Xeon B fp32 {threads} threads": 60e9,
    }
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads + 1)
    assert machine_key(CPU, "fp32") == f"cpu Xeon B fp32 {threads + 1} threads"  # threads: another entry


def test_an_unreadable_peak_cache_is_measured_over_and_an_unwritable_one_kept(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(runtime, "_measured_peak", lambda device, dtype: 80e9)
    (peak_cache()).write_text('{"cpu x fp32 2 threads": 1e11, "torn')
    assert matmul_peak_flops(CPU, "fp32") == 80e9
    assert json.loads((peak_cache()).read_text()) == {machine_key(CPU, "fp32"): 80e9}
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path / "a-file"))
    (tmp_path / "a-file").write_text("")  # not a folder: nothing can be cached, the run goes on
    assert matmul_peak_flops(CPU, "fp32") == 80e9


@pytest.mark.parametrize(
    "name, kind",
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA A100-PCIE-40GB", "a100"),
        ("NVIDIA H100 PCIe", None),  # the table's H100 is the SXM part; the PCIe card is slower
        ("NVIDIA H100 NVL", None),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_gpus_are_matched_to_their_datasheet_row(name: str, kind: str | None) -> None:
    assert datasheet_kind(name) == kind


def test_a_listed_gpu_divides_by_its_datasheet_peak_an_unlisted_one_by_a_measured_one(monkeypatch) -> None:
    cuda = torch.device("cuda")
    monkeypatch.setattr(runtime, "matmul_peak_flops", lambda device, dtype: 123e12)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert device_peak(cuda, "bf16") == Peak(989e12, "h100 bf16 dense, datasheet", measured=False)
    assert device_peak(cuda, "bf16").name == "MFU"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L4")
    peak = device_peak(cuda, "bf16")
    assert peak.flops == 123e12 and peak.measured and "NVIDIA L4 is not in the datasheet table" in peak.source
    assert peak.name == "fraction of measured matmul peak"
    assert device_peak(CPU, "fp32").measured and device_peak(CPU, "fp32").flops == 123e12


def test_over_100_percent_is_flagged_as_a_measurement_error_never_as_mfu() -> None:
    datasheet, measured = Peak(1e12, "h100 bf16 dense, datasheet", False), Peak(1e11, "measured", True)
    assert datasheet.entry(4e11) == {"mfu": 0.4, "peak_flops": 1e12}
    assert measured.entry(4e10) == {"matmul_peak_fraction": 0.4, "peak_flops": 1e11}
    assert measured.entry(1.5e11) == {"over_peak": 1.5, "peak_flops": 1e11}
    assert datasheet.entry(2e12) == {"over_peak": 2.0, "peak_flops": 1e12}
    assert datasheet.describe(4e11) == "MFU 40.0% (peak 1 TFLOP/s, h100 bf16 dense, datasheet)"
    assert measured.describe(4e10) == "fraction of measured matmul peak 40.0% (peak 100 GFLOP/s, measured)"
    over = measured.describe(1.5e11)
    assert "a measurement error, no MFU" in over and "150%" not in over and "fraction of" not in over
    assert measured.times(2) == Peak(2e11, "measured", True)  # a data-parallel job's


def test_the_run_config_saves_the_resolved_dtype(monkeypatch, tmp_path, char_data) -> None:
    from lmforge.config import load_config
    from lmforge.train.trainer import train
    from tests.conftest import TINY

    monkeypatch.setenv(NATIVE_BF16_ENV, "0")
    config = load_config(None, [f"data.dir={char_data}", *TINY, "train.max_steps=2"])
    assert config.train.dtype == "auto"  # the default
    train(config, tmp_path / "run")
    assert load_config(tmp_path / "run" / "config.toml").train.dtype == "fp32"
