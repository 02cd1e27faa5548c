"""`lmforge serve`'s bad arguments: one line of error, before any model is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_bad_input import assert_one_line_error, usage_error


@pytest.mark.parametrize(("key", "env"), [("", None), (None, " ")], ids=["option", "environment"])
def test_an_empty_api_key_is_a_one_line_error_not_an_open_server(
    cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, key: str | None, env: str | None
) -> None:
    monkeypatch.delenv("LMFORGE_API_KEY", raising=False)
    if env is not None:
        monkeypatch.setenv("LMFORGE_API_KEY", env)
    args = [tmp_path / "no-run"] + ([f"--api-key={key}"] if key is not None else [])
    code, _, err = cli("serve", *args)
    assert_one_line_error(
        code, err, "serve", "--api-key is empty" if key is not None else "LMFORGE_API_KEY is empty"
    )


@pytest.mark.parametrize("port", ["65536", "-1", "http"])
def test_a_bad_port_is_a_usage_error(cli, capsys, tmp_path: Path, port: str) -> None:
    code, err = usage_error(cli, capsys, "serve", tmp_path / "no-run", f"--port={port}")
    assert code == 2 and err.splitlines()[-1].startswith("lmforge serve: error: argument --port: ")


def test_compile_without_a_cpp_compiler_is_a_one_line_error(cli, tiny_run: Path, tmp_path: Path) -> None:
    from torch._inductor import config

    # inductor's C++ compilers to try; its own patch, which restores the entry (monkeypatch deletes it)
    with config.patch({"cpp.cxx": (str(tmp_path / "no-compiler"),)}):
        code, _, err = cli("serve", tiny_run, "--compile", "--device", "cpu")
    assert_one_line_error(code, err, "serve", "--compile needs a C++ compiler")


def test_max_autotune_without_compile_is_a_one_line_error(cli, tiny_run: Path) -> None:
    code, _, err = cli("serve", tiny_run, "--max-autotune", "--device", "cpu")
    assert_one_line_error(
        code, err, "serve", "--max-autotune tunes the compiled decode steps: it needs --compile"
    )
