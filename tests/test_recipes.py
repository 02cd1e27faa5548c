"""`lmforge recipes`: list, show and copy the packaged configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.config import load_config
from lmforge.recipes import recipe, recipes


@pytest.mark.parametrize("action", [[], ["list"]])
def test_list_names_every_recipe_with_its_first_header_line(cli, action: list[str]) -> None:
    code, out, _ = cli("recipes", *action)
    assert code == 0
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == [r.name for r in recipes()]
    speedrun = next(line for line in lines if line.startswith("speedrun-shakespeare-char-cpu "))
    assert speedrun.split(None, 1)[1] == recipe("speedrun-shakespeare-char-cpu").summary
    assert "tasks/sst2" in out


def test_show_prints_the_file_and_copy_writes_a_loadable_config(cli, tmp_path: Path) -> None:
    code, out, _ = cli("recipes", "show", "tasks/sst2.toml")
    assert code == 0 and out == recipe("tasks/sst2").path.read_text(encoding="utf-8")
    code, out, _ = cli("recipes", "copy", "shakespeare-char", tmp_path / "mine")
    copied = tmp_path / "mine" / "shakespeare-char.toml"
    assert code == 0 and str(copied) in out
    assert load_config(copied).model.n_layer == load_config(recipe("shakespeare-char").path).model.n_layer


def test_copy_never_replaces_a_file_without_overwrite(cli, tmp_path: Path) -> None:
    mine = tmp_path / "shakespeare-char.toml"
    mine.write_text("# my edits\n", encoding="utf-8")
    code, _, err = cli("recipes", "copy", "shakespeare-char", tmp_path)
    assert code != 0 and str(mine) in err and len(err.strip().splitlines()) == 1
    assert mine.read_text(encoding="utf-8") == "# my edits\n"
    assert cli("recipes", "copy", "shakespeare-char", tmp_path, "--overwrite")[0] == 0
    assert mine.read_text(encoding="utf-8") == recipe("shakespeare-char").path.read_text(encoding="utf-8")


def test_an_unknown_name_is_one_line_listing_the_recipes(cli) -> None:
    code, out, err = cli("recipes", "show", "no-such-recipe")
    assert code != 0 and out == ""
    assert err.strip().count("\n") == 0 and "no-such-recipe" in err and "shakespeare-char" in err
