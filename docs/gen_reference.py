"""The generated pages of the docs site, as an MkDocs hook (mkdocs.yml `hooks:`).

Written from the code at build time, so they cannot drift from it:

- verbs/index.md: the table of verbs, each with its one-line help, linking to its page;
- reference/cli.md: every verb's `--help`, from the argparse parsers `lmforge.cli.build_parser` builds;
- reference/config.md: every config key with its type, default and the comment beside it in
  `src/lmforge/config.py` (a field without a comment fails the build);
- results/record.md: benchmarks/RESULTS.md, the record of every measured figure, with the files it links to;
- changelog.md: CHANGELOG.md.

tests/docs/test_docs.py calls these functions too.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import os
import re
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG_PY = ROOT / "src" / "lmforge" / "config.py"
TABLE = "table"  # the type of a config field that is a table of keys of its own ([data.columns])
HELP_WIDTH = "100"  # columns argparse wraps the help at, whatever the terminal that builds the site


def _import_cli():
    """lmforge.cli from this tree (not another installed copy)."""
    if str(ROOT / "src") not in sys.path:
        sys.path.insert(0, str(ROOT / "src"))
    import lmforge.cli

    return lmforge.cli


def verb_parsers() -> dict[str, argparse.ArgumentParser]:
    """`VERB` or `VERB ACTION` (e.g. `tasks prepare`) -> its parser, in --help's order."""
    cli = _import_cli()
    found: dict[str, argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, prefix: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    found[f"{prefix}{name}".strip()] = sub
                    walk(sub, f"{prefix}{name} ")

    walk(cli.build_parser(), "")
    return found


def verb_help(parser: argparse.ArgumentParser) -> str:
    """A parser's --help text at a fixed width."""
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_WIDTH
    try:
        return parser.format_help()
    finally:
        if saved is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = saved


def cli_reference() -> str:
    """The CLI reference page: the top-level help, then each verb's."""
    cli = _import_cli()
    parts = [
        "# CLI reference\n",
        "Generated from the argument parsers (`lmforge VERB --help` prints the same). "
        "Each verb's page explains its options with examples.\n",
        f"```text\n{verb_help(cli.build_parser())}```\n",
    ]
    for name, parser in verb_parsers().items():
        top = name.split()[0]
        parts.append(f"## lmforge {name}\n")
        parts.append(f"More on the [`{top}` page](../verbs/{top}.md).\n")
        parts.append(f"```text\n{verb_help(parser)}```\n")
    return "\n".join(parts)


def verbs_index() -> str:
    """The verbs page: one row per verb of `lmforge --help`, linking to docs/verbs/VERB.md."""
    cli = _import_cli()
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    rows = [f"| [`{c.dest}`]({c.dest}.md) | {c.help} |" for c in subparsers._choices_actions]
    return "\n".join(
        [
            "# Verbs\n",
            "Everything lmforge does is one verb of the `lmforge` command (`lmforge VERB --help` lists its "
            "options; the [CLI reference](../reference/cli.md) has them all). Commands assume the "
            "virtual environment is active (`source .venv/bin/activate`), or call `.venv/bin/lmforge`.\n",
            "| verb | what it does |",
            "|---|---|",
            *rows,
            "",
        ]
    )


def _comments(source: str) -> dict[int, str]:
    """Line number -> the text of the comment on that line."""
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return {tok.start[0]: tok.string.lstrip("#").strip() for tok in tokens if tok.type == tokenize.COMMENT}


def _field_comment(node: ast.AnnAssign, comments: dict[int, str], lines: list[str]) -> str:
    """The comment-only lines right above a field, then the comment at its end: what the field means."""
    above: list[str] = []
    line = node.lineno - 1
    while line >= 1 and lines[line - 1].strip().startswith("#"):
        above.insert(0, comments[line])
        line -= 1
    trailing = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
    return " ".join(above + trailing)


def _toml_type(annotation: ast.expr, aliases: dict[str, ast.expr]) -> str:
    """A field's type as a TOML writer sees it: `Literal['a', 'b']` is `"a" | "b"`, and so is a
    module-level alias of it (`SFTFormat = Literal[...]`)."""
    annotation = aliases.get(ast.unparse(annotation), annotation)
    if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value) == "Literal":
        return " | ".join(json.dumps(v) for v in ast.literal_eval(annotation.slice))
    return ast.unparse(annotation)


def _aliases(tree: ast.Module) -> dict[str, ast.expr]:
    """Module-level `Name = Literal[...]` type aliases, by name."""
    return {
        node.targets[0].id: node.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and len(node.targets) == 1
        and isinstance(node.targets[0], ast.Name)
        and isinstance(node.value, ast.Subscript)
        and ast.unparse(node.value.value) == "Literal"
    }


def _toml_default(value: ast.expr | None) -> str:
    """A field's default as TOML writes it (`true`, `"rope"`, `[0.9, 0.95]`); None is `unset`."""
    if value is None:
        return "required"
    try:
        literal = ast.literal_eval(value)
    except ValueError:  # field(default_factory=...): a section
        return ast.unparse(value)
    if literal is None:
        return "unset"
    return json.dumps(list(literal) if isinstance(literal, tuple) else literal)


def config_fields() -> dict[str, tuple[str, list[tuple[str, str, str, str]]]]:
    """Section -> (its docstring, [(key, type, default, comment)]), read from config.py's source.

    Raises ValueError naming every field that has no comment: the comments are the reference."""
    source = CONFIG_PY.read_text()
    comments, lines = _comments(source), source.splitlines()
    tree = ast.parse(source)
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    aliases = _aliases(tree)
    sections: dict[str, tuple[str, list[tuple[str, str, str, str]]]] = {}
    missing: list[str] = []

    def rows_of(cls: ast.ClassDef, prefix: str) -> list[tuple[str, str, str, str]]:
        """The rows of a table's fields, each nested table's own after its row (`columns.prompt`)."""
        rows = []
        for node in (f for f in cls.body if isinstance(f, ast.AnnAssign)):
            key, comment = f"{prefix}{node.target.id}", _field_comment(node, comments, lines)
            if not comment:
                missing.append(f"{section.target.id}.{key}")
            table = classes.get(ast.unparse(node.annotation))
            if table is None:
                rows.append((key, _toml_type(node.annotation, aliases), _toml_default(node.value), comment))
            else:
                rows += [(key, TABLE, "", comment), *rows_of(table, f"{key}.")]
        return rows

    for section in (f for f in classes["Config"].body if isinstance(f, ast.AnnAssign)):
        cls = classes[ast.unparse(section.annotation)]
        sections[section.target.id] = (ast.get_docstring(cls) or "", rows_of(cls, ""))
    if missing:
        raise ValueError(f"{CONFIG_PY}: config fields without a comment: {', '.join(missing)}")
    return sections


def config_reference() -> str:
    """The config reference page: one list per TOML section, one item per key."""
    parts = [
        "# Config reference\n",
        "Every key of a run's TOML config, generated from the comments beside the fields of "
        "`src/lmforge/config.py`. Set a key in the file's `[section]` table, or on the command line "
        "with `--set section.key=value` (see [`train`](../verbs/train.md)). Unknown keys, wrong types "
        "and impossible values are one-line errors naming the key.\n",
    ]
    for section, (doc, rows) in config_fields().items():
        parts.append(f"## `[{section}]`\n")
        if doc:
            parts.append(doc + "\n")
        for key, type_, default, comment in rows:
            if type_ == TABLE:
                parts.append(f"- **`{section}.{key}`** (a table: its keys follow): {comment}")
            else:
                parts.append(f"- **`{section}.{key}`** (`{type_}`, default `{default}`): {comment}")
        parts.append("")
    return "\n".join(parts)


VENV_NOTE = (
    "*Commands on this page run in the project's virtual environment: `source .venv/bin/activate` first "
    "(after `make demo` or `make install`), or write `.venv/bin/lmforge` for `lmforge`.*\n"
)


def with_venv_note(markdown: str) -> str:
    """A page that shows `lmforge` commands says, under its title, where that command comes from."""
    if not re.search(r"^```bash\n(?:[^`]*\n)?lmforge ", markdown, re.M):
        return markdown
    title, sep, rest = markdown.partition("\n")
    return f"{title}{sep}\n{VENV_NOTE}{rest}" if title.startswith("# ") else markdown


LINK = re.compile(r"\]\(([^)#\s]+)(#[^)]*)?\)")


def record_files() -> list[tuple[str, Path]]:
    """The files benchmarks/RESULTS.md links to by relative path, that the site must carry beside it."""
    text = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    found = []
    for target, _ in LINK.findall(text):
        path = ROOT / "benchmarks" / target
        if "://" not in target and not target.startswith("..") and path.is_file():
            found.append((target, path))
    return found


def on_page_markdown(markdown, page, config, files):  # noqa: ANN001, ANN201  (MkDocs hook)
    """Every page with `lmforge` commands gets the note on the virtual environment."""
    return with_venv_note(markdown)


def on_files(files, config):  # noqa: ANN001, ANN201  (MkDocs hook)
    """Add the generated pages (and the files the benchmark record links to) to the site."""
    from mkdocs.structure.files import File

    pages = {
        "verbs/index.md": verbs_index(),
        "reference/cli.md": cli_reference(),
        "reference/config.md": config_reference(),
        # its links into docs/ (pictures) point at the same files in the site, whose root docs/ is
        "results/record.md": (ROOT / "benchmarks" / "RESULTS.md").read_text().replace("](../docs/", "](../"),
        "changelog.md": (ROOT / "CHANGELOG.md").read_text(),
    }
    for uri, content in pages.items():
        files.append(File.generated(config, uri, content=content))
    for target, path in record_files():
        files.append(File.generated(config, f"results/{target}", abs_src_path=str(path)))
    return files
