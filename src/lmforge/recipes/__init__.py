"""The recipes: TOML configs shipped inside the package, named by their path here without `.toml`
(`shakespeare-char`, `tasks/sst2`).

`lmforge train NAME` and `lmforge finetune NAME` read a recipe where NAME is not a file;
`lmforge recipes` lists, shows and copies them. This folder is their one copy.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import LmforgeError

RECIPES_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Recipe:
    """One packaged recipe: its name and its file."""

    name: str  # e.g. "tasks/sst2"
    path: Path

    @property
    def summary(self) -> str:
        """The first line of the recipe's header comment."""
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if line.startswith("#"):
                return line.lstrip("#").strip()
            if line.strip():
                break
        return ""


def recipes() -> list[Recipe]:
    """Every packaged recipe, sorted by name (top-level ones first, then tasks/...)."""
    found = [
        Recipe(path.relative_to(RECIPES_DIR).with_suffix("").as_posix(), path)
        for path in RECIPES_DIR.rglob("*.toml")
    ]
    return sorted(found, key=lambda r: (r.name.count("/"), r.name))


def recipe(name: str) -> Recipe:
    """The recipe called `name` (a trailing `.toml` is allowed); a one-line error listing them if none."""
    wanted = name.removesuffix(".toml")
    for candidate in recipes():
        if candidate.name == wanted:
            return candidate
    known = ", ".join(r.name for r in recipes())
    raise LmforgeError(f"no recipe {name!r} (recipes: {known})")


def config_path(spec: str) -> Path:
    """A CONFIG argument as a file: the file itself where it exists, else the packaged recipe of that name."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise LmforgeError(f"{spec}: not a config file")
    try:
        return recipe(spec).path
    except LmforgeError:
        known = ", ".join(r.name for r in recipes())
        raise LmforgeError(
            f"{spec}: no such config file, nor a recipe of that name (recipes: {known})"
        ) from None


def copy_recipe(name: str, folder: Path, *, overwrite: bool = False) -> Path:
    """Copy recipe `name` into `folder` (created if needed) as NAME's file name; never replaces a file
    unless `overwrite`. Returns the new file."""
    source = recipe(name)
    if folder.exists() and not folder.is_dir():
        raise LmforgeError(f"{folder}: not a folder")
    target = folder / source.path.name
    if target.exists() and not overwrite:
        raise LmforgeError(f"{target} exists (use --overwrite to replace it)")
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{target.name}.partial"
    try:
        shutil.copyfile(source.path, partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target
