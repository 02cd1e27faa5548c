"""The docs cannot rot: their runnable blocks run, their flags exist, every verb has a page, the site
builds with `mkdocs build --strict`, and the generated references cover the code."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmforge.cli import VERBS
from lmforge.config import Config, tomllib
from tests.conftest import DATASETS, REPO
from tests.docs.toy_lmforge import FORK_SERVER_ENV, FORK_SERVER_FLAG, PYTHON_FLAG

DOCS = REPO / "docs"
MKDOCS_YML = REPO / "mkdocs.yml"
TOY_LMFORGE = Path(__file__).with_name("toy_lmforge.py")
RUN_MARKER = "<!-- run -->"
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
RUNNABLE = re.compile(rf"^{re.escape(RUN_MARKER)}\n```bash\n(.*?)^```", re.S | re.M)
INLINE_CODE = re.compile(r"`([^`\n]+)`")
BLOCK_TIMEOUT_S = 600  # one block, on a slow shared machine; at toy size a block takes seconds


def load_generator():
    """docs/gen_reference.py, the MkDocs hook that writes the generated pages."""
    spec = importlib.util.spec_from_file_location("gen_reference", DOCS / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def doc_pages() -> list[Path]:
    """The Markdown pages: those in mkdocs.yml's nav first, in its order, then any others."""
    in_nav = [DOCS / m for m in re.findall(r"([\w./-]+\.md)\s*$", MKDOCS_YML.read_text(), re.M)]
    on_disk = sorted(DOCS.rglob("*.md"))
    return [p for p in in_nav if p.is_file()] + [p for p in on_disk if p not in in_nav]


def runnable_blocks() -> list[tuple[str, str]]:
    """(page:line, commands) of every block marked runnable, in reading order."""
    blocks = []
    for page in doc_pages():
        text = page.read_text()
        for match in RUNNABLE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            blocks.append((f"{page.relative_to(REPO)}:{line}", match.group(1)))
    return blocks


def test_the_docs_mark_runnable_blocks_on_every_verb_page_that_can_run_offline() -> None:
    marked = {where.split(":")[0] for where, _ in runnable_blocks()}
    for verb in ("prepare", "train", "finetune", "eval", "sample", "chat", "export", "import", "estimate"):
        assert f"docs/verbs/{verb}.md" in marked, f"docs/verbs/{verb}.md has no {RUN_MARKER} block"


def _toy_workspace(tmp_path: Path) -> dict[str, str]:
    """A folder to run the blocks in, as a clone's root: src/, docs/ and tests/ (fixtures), `lmforge` and
    `.venv/bin/lmforge` at toy size; the environment to run them with."""
    for name in ("src", "docs", "tests", "benchmarks"):
        (tmp_path / name).symlink_to(REPO / name)
    shim = f'#!/bin/sh\nexec "{sys.executable}" "{TOY_LMFORGE}" "$@"\n'
    for folder in (tmp_path / "bin", tmp_path / ".venv" / "bin"):
        folder.mkdir(parents=True)
        (folder / "lmforge").write_text(shim)
        (folder / "lmforge").chmod(0o755)
    python = tmp_path / ".venv" / "bin" / "python"  # `.venv/bin/python` in a block: this interpreter
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{TOY_LMFORGE}" {PYTHON_FLAG} "$0" "$@"\n')
    python.chmod(0o755)
    env = dict(os.environ)
    env.update(
        PATH=f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}",
        LMFORGE_DATA_DIR=str(DATASETS.root),
        LMFORGE_DOCS_FIXTURES="0" if DATASETS.real else "1",
        LMFORGE_OFFLINE="1",
        LMFORGE_CACHE_DIR=str(tmp_path / "cache"),
        WANDB_MODE="offline",
        PYTHONPATH=os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]),
    )
    return env


@contextlib.contextmanager
def fork_server(env: dict[str, str], *, cwd: Path) -> Iterator[dict[str, str]]:
    """toy_lmforge.py's fork server, started with `env` in `cwd`: `env` with its socket, so that each
    `lmforge` of a block runs as a forked child of it (no `import torch` of its own). Where there is
    no pidfd (not Linux), `env` itself: each command a process of its own, minutes slower."""
    if not hasattr(os, "pidfd_open"):
        yield env
        return
    with tempfile.TemporaryDirectory(prefix="lmforge-docs-") as folder:  # a short path: sockets' limit
        socket_path, log = Path(folder) / "socket", Path(folder) / "server.log"
        with open(log, "wb") as stderr:
            server = subprocess.Popen(
                [sys.executable, str(TOY_LMFORGE), FORK_SERVER_FLAG, str(socket_path)],
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
            )
        try:
            ready = server.stdout.readline()  # a line once it listens; EOF if it died first
            assert ready, f"the fork server did not start:\n{log.read_text()[-3000:]}"
            yield {**env, FORK_SERVER_ENV: str(socket_path)}
        finally:
            server.terminate()
            server.wait(timeout=60)
            server.stdout.close()


@pytest.mark.slow
def test_every_runnable_block_runs_at_toy_size(tmp_path: Path) -> None:
    """Each `<!-- run -->` block, in the order a reader meets them (getting started first), in one
    folder, so a page can use what an earlier one made; a failure names the page and line."""
    with fork_server(_toy_workspace(tmp_path), cwd=tmp_path) as env:
        for where, commands in runnable_blocks():
            done = subprocess.run(
                ["bash", "-e", "-o", "pipefail", "-c", commands],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=BLOCK_TIMEOUT_S,
                stdin=subprocess.DEVNULL,
            )
            assert done.returncode == 0, f"{where}: exit {done.returncode}\n{commands}\n{done.stderr[-3000:]}"


def command_lines(text: str) -> list[str]:
    """Every piece of code in a page (fenced blocks, inline spans), continuation lines joined."""
    # a backslash continues a command; so does an indented line, as a usage line wraps in these pages
    code = [re.sub(r"\n(?=[ \t])", " ", m.group(1).replace("\\\n", " ")) for m in FENCE.finditer(text)]
    outside = FENCE.sub("", text)
    return [line for chunk in code for line in chunk.splitlines()] + INLINE_CODE.findall(outside)


COMMAND = re.compile(r"(?:^|[\s;(&|])(?:[\w./-]*/)?(?:-m )?lmforge((?:\s+\S+)+)")
GLOBAL_FLAGS = {"-q", "--quiet", "-v", "--verbose", "--version", "-h", "--help"}
END_OF_COMMAND = {"|", "||", "&&", ";", "#", ">", "<", "2>&1", ">>"}


def lmforge_commands(line: str, parsers: dict) -> list[tuple[str, list[str]]]:
    """(verb, its --flags) of each `lmforge VERB ...` command in a line of code."""
    found = []
    for match in COMMAND.finditer(line.removeprefix("$ ")):
        words = match.group(1).split()
        while words and words[0] in GLOBAL_FLAGS:
            words.pop(0)
        if not words or words[0] not in parsers:
            continue  # `lmforge` as a name in prose or an error message, not a command
        verb = words[0]
        if len(words) > 1 and f"{verb} {words[1]}" in parsers:
            verb = f"{verb} {words[1]}"
        flags = []
        for word in words[1:]:
            if word in END_OF_COMMAND or word.startswith("#"):
                break
            flag = re.match(r"\[*(--?[A-Za-z][\w-]*)", word)
            if flag:
                flags.append(flag.group(1))
        found.append((verb, flags))
    return found


def test_every_flag_the_docs_give_a_verb_exists_in_its_help() -> None:
    parsers = load_generator().verb_parsers()
    wrong = []
    pages = {page: command_lines(page.read_text()) for page in [*doc_pages(), REPO / "README.md"]}
    # a recipe's header comment holds the commands that prepare its data (`lmforge recipes show`)
    pages |= {recipe: recipe_header_lines(recipe) for recipe in sorted(RECIPES.rglob("*.toml"))}
    for page, lines in pages.items():
        for line in lines:
            for verb, flags in lmforge_commands(line, parsers):
                known = {s for action in parsers[verb]._actions for s in action.option_strings}
                wrong += [f"{page.relative_to(REPO)}: lmforge {verb} {f}" for f in flags if f not in known]
    assert not wrong, "flags that --help does not list:\n" + "\n".join(wrong)


RECIPES = REPO / "src" / "lmforge" / "recipes"


def recipe_header_lines(recipe: Path) -> list[str]:
    """The comment lines of a recipe, without their `#`."""
    return [line.lstrip("#") for line in recipe.read_text().splitlines() if line.startswith("#")]


def test_the_flag_check_reads_the_commands_in_a_recipes_header(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text("# Prepare:\n#   lmforge prepare tinyshakespeare --tokenizer char --out x\n[data]\n")
    line = recipe_header_lines(recipe)[1]
    assert lmforge_commands(line, load_generator().verb_parsers()) == [("prepare", ["--tokenizer", "--out"])]


def test_the_flag_check_sees_commands_in_code_and_ignores_prose() -> None:
    parsers = load_generator().verb_parsers()
    assert lmforge_commands("$ lmforge -q train a.toml --set x=1 --resume", parsers) == [
        ("train", ["--set", "--resume"])
    ]
    assert lmforge_commands("lmforge tasks prepare cloze --from gutenberg [--examples N]", parsers) == [
        ("tasks prepare", ["--from", "--examples"])
    ]
    assert lmforge_commands("torchrun --nproc-per-node 2 -m lmforge eval RUN --json | jq .", parsers) == [
        ("eval", ["--json"])
    ]
    assert lmforge_commands("lmforge train: error: log.tensorboard = true", parsers) == []
    wrapped = "```bash\nlmforge sample RUN [--top-k 200]\n    [--seed 1337]\nlmforge runs\n```\n"
    assert command_lines(wrapped) == ["lmforge sample RUN [--top-k 200]     [--seed 1337]", "lmforge runs"]


SHOWN_DEFAULT = re.compile(r"\[(--[\w-]+)[ =]([a-z0-9][\w.]*)\]")  # `[--top-k 200]`, not `[--limit N]`


def _same_value(shown: str, default: object) -> bool:
    """Whether a value written in a page is the parser's default (`5` is `5.0`)."""
    try:
        return float(shown) == float(default)
    except (TypeError, ValueError):
        return shown == str(default)


def test_the_defaults_a_verbs_usage_line_shows_are_its_parsers() -> None:
    parsers = load_generator().verb_parsers()
    wrong = []
    for page in [*doc_pages(), REPO / "README.md"]:
        for line in command_lines(page.read_text()):
            for verb, _ in lmforge_commands(line, parsers):
                defaults = {s: a.default for a in parsers[verb]._actions for s in a.option_strings}
                for flag, shown in SHOWN_DEFAULT.findall(line):
                    # a default of None is worked out when the verb runs: the page says how
                    if defaults.get(flag) is not None and not _same_value(shown, defaults[flag]):
                        wrong.append(
                            f"{page.relative_to(REPO)}: lmforge {verb} [{flag} {shown}]: {defaults[flag]}"
                        )
    assert not wrong, "usage lines whose default is not the parser's:\n" + "\n".join(wrong)


def config_keys() -> set[str]:
    """Every `section.key` of the config (and `data.columns.prompt`, a table's keys)."""
    sections = typing.get_type_hints(Config)
    keys = set()
    for section, cls in sections.items():
        for name, kind in typing.get_type_hints(cls).items():
            keys.add(f"{section}.{name}")
            if dataclasses.is_dataclass(kind):
                keys |= {f"{section}.{name}.{sub}" for sub in typing.get_type_hints(kind)}
    return keys


# a file (`train.jsonl`, `model.safetensors`) or a method (`model.generate`) is not a key
NOT_A_KEY = re.compile(r"\.(jsonl|json|csv|tsv|txt|gz|bin|py|safetensors)$|^model\.generate$")


def named_config_keys(text: str) -> list[str]:
    """The `section.key` a page names: an inline span that is a key (or `key = value`), or a `--set`."""
    sections = "|".join(typing.get_type_hints(Config))
    key = rf"(?:{sections})\.[a-z_][\w.]*?"
    spans = [m.group(1) for s in INLINE_CODE.findall(text) if (m := re.fullmatch(rf"({key})(?:\s*=.*)?", s))]
    sets = re.findall(rf"--set[ =]['\"]?({key})=", text)
    return [k for k in spans + sets if not NOT_A_KEY.search(k)]


def test_every_config_key_the_docs_name_exists() -> None:
    known = config_keys()
    wrong = []
    for page in [*doc_pages(), REPO / "README.md", REPO / "CHANGELOG.md"]:
        wrong += [
            f"{page.relative_to(REPO)}: {k}" for k in named_config_keys(page.read_text()) if k not in known
        ]
    assert not wrong, "config keys that config.py does not have:\n" + "\n".join(wrong)


def test_the_key_check_sees_keys_in_spans_and_set_and_skips_files() -> None:
    text = (
        "`train.max_stepz = 5` or `--set optim.lrr=1`; `lmforge train --set model.n_layerz=2`; `train.jsonl`"
    )
    assert named_config_keys(text) == ["train.max_stepz", "optim.lrr", "model.n_layerz"]
    assert "data.columns.prompt" in config_keys() and "train.max_steps" in config_keys()


def test_every_verb_in_help_has_a_page_in_the_nav() -> None:
    nav = MKDOCS_YML.read_text()
    for verb in VERBS:
        page = DOCS / "verbs" / f"{verb}.md"
        assert page.is_file(), f"lmforge {verb} has no page: {page.relative_to(REPO)}"
        assert f"verbs/{verb}.md" in nav, f"{page.relative_to(REPO)} is not in mkdocs.yml's nav"


def test_every_config_field_has_the_comment_the_reference_is_made_of() -> None:
    sections = load_generator().config_fields()
    assert {"data", "model", "train", "optim", "privacy"} <= set(sections)
    assert all(comment for _, rows in sections.values() for *_, comment in rows)
    assert "**`train.max_steps`** (`int`, default `2000`)" in load_generator().config_reference()


def test_the_config_reference_holds_every_config_key_nested_tables_too() -> None:
    reference = load_generator().config_reference()
    missing = sorted(k for k in config_keys() if f"**`{k}`**" not in reference)
    assert not missing, f"the config reference lacks {missing}"
    assert "default_factory" not in reference  # a table's default is its keys', not Python source


def test_the_config_reference_spells_out_the_choices_of_a_type_alias() -> None:
    """`data.format`'s type is `SFTFormat` in config.py: the reader needs its values."""
    rows = [(s, row) for s, (_, rows) in load_generator().config_fields().items() for row in rows]
    opaque = [f"{s}.{key}: {type_}" for s, (key, type_, *_) in rows if re.fullmatch(r"[A-Z]\w*", type_)]
    assert not opaque, f"types the reference does not explain: {opaque}"
    assert '(`"auto" | "prompt_completion" | "messages" | "alpaca" | "sharegpt"`' in (
        load_generator().config_reference()
    )


@pytest.mark.parametrize(
    ("source", "uncommented"),
    [
        (
            "class TrainConfig:\n    steps: int = 1  # how many\n    seed: int = 0\n\n"
            "class Config:\n    train: TrainConfig = TrainConfig()  # [train]\n",
            "train.seed",
        ),
        (  # a nested table's keys too
            "class Columns:\n    prompt: str = ''\n\n"
            "class DataConfig:\n    columns: Columns = field(default_factory=Columns)  # [data.columns]\n\n"
            "class Config:\n    data: DataConfig = DataConfig()  # [data]\n",
            "data.columns.prompt",
        ),
    ],
)
def test_a_config_field_without_a_comment_fails_the_reference(
    tmp_path: Path, source: str, uncommented: str
) -> None:
    generator = load_generator()
    generator.CONFIG_PY = tmp_path / "config.py"
    generator.CONFIG_PY.write_text(source)
    with pytest.raises(ValueError, match=f"without a comment: {uncommented}"):
        generator.config_fields()


def test_the_cli_reference_holds_every_verbs_help() -> None:
    reference = load_generator().cli_reference()
    for verb in [*VERBS, "tasks prepare"]:
        assert f"## lmforge {verb}\n" in reference
    assert "--max-new-tokens" in reference and "--canary-repeats" in reference


def test_the_environment_page_lists_every_variable_lmforge_reads() -> None:
    page = (DOCS / "reference" / "environment.md").read_text()
    source = "\n".join(p.read_text() for p in (REPO / "src").rglob("*.py"))
    names = set(re.findall(r"\bLMFORGE_[A-Z0-9_]+\b", source))
    assert names, "no LMFORGE_ variable found in src/"
    missing = sorted(n for n in names if f"`{n}`" not in page)
    assert not missing, f"docs/reference/environment.md lacks {missing}"


def test_the_faq_names_every_extra_of_the_package() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    answer = (DOCS / "faq.md").read_text().split("## Which extras do I need?")[1].split("\n## ")[0]
    missing = sorted(e for e in extras if e != "dev" and f"`{e}`" not in answer)
    assert not missing, f"docs/faq.md's extras answer lacks {missing}"


@pytest.mark.slow
def test_the_site_builds_strictly(tmp_path: Path) -> None:
    """No broken link or anchor, no page left out of the nav, the generated pages build."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "-f",
            str(MKDOCS_YML),
            "-d",
            str(tmp_path / "site"),
        ],
        cwd=REPO,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    for page in ("reference/cli/index.html", "reference/config/index.html", "results/record/index.html"):
        assert (tmp_path / "site" / page).is_file(), page


def test_a_page_with_lmforge_commands_says_where_the_command_comes_from() -> None:
    generator = load_generator()
    page = "# lmforge sample\n\nGenerate text.\n\n```bash\nlmforge sample RUN\n```\n"
    noted = generator.with_venv_note(page)
    assert noted.startswith("# lmforge sample\n\n*Commands on this page run in the project's virtual")
    assert "source .venv/bin/activate" in noted and "`.venv/bin/lmforge`" in noted
    assert generator.with_venv_note("# Results\n\nNo commands.\n") == "# Results\n\nNo commands.\n"
