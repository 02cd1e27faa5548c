"""Precision choice and the MFU denominator (`lmforge.runtime`)."""

import pytest
import torch

from lmforge import runtime
from lmforge.errors import LmforgeError
from lmforge.runtime import NATIVE_BF16_ENV, matmul_peak_flops, native_bf16, resolve_dtype

CPU = torch.device("cpu")


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


def test_the_run_config_saves_the_resolved_dtype(monkeypatch, tmp_path, char_data) -> None:
    from lmforge.config import load_config
    from lmforge.train.trainer import train
    from tests.conftest import TINY

    monkeypatch.setenv(NATIVE_BF16_ENV, "0")
    config = load_config(None, [f"data.dir={char_data}", *TINY, "train.max_steps=2"])
    assert config.train.dtype == "auto"  # the default
    train(config, tmp_path / "run")
    assert load_config(tmp_path / "run" / "config.toml").train.dtype == "fp32"
