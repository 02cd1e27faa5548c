"""`lmforge --version` prints the installed package's version, the one pyproject.toml gives."""

from __future__ import annotations

import re
import sys
from importlib.metadata import version

import pytest

from lmforge.cli import main
from tests.conftest import REPO

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def test_version_prints_the_package_version_and_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"lmforge {version('lmforge')}\n"


def test_the_installed_version_is_pyproject_tomls() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert version("lmforge") == pyproject["project"]["version"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", version("lmforge"))


def test_the_changelog_names_the_version() -> None:
    changelog = (REPO / "CHANGELOG.md").read_text()
    assert f"## {version('lmforge')} (" in changelog
