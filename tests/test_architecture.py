"""The architecture of lmforge as rules that every module keeps, read from the source with `ast`.

- No function or method is longer than MAX_FUNCTION_LINES lines.
- No function or method takes more than MAX_POSITIONAL parameters by position (self/cls not counted):
  the rest are keyword-only, so a call names what it passes.
- The modules of lmforge import each other without a cycle.
- The packages keep the one layer order, LAYERS: a package imports only packages on lower layers.
- Inference imports nothing from training: only training itself and the command line may.
- Data imports nothing from the model: what both need (lmforge.targets) lives below both.
- The house style's tool configuration (ruff, line length) is in pyproject.toml.

This file imports nothing from lmforge: the rules hold even for code that cannot be imported,
and they are checked in well under a second.
"""

from __future__ import annotations

import ast
import functools
import sys
from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
MAX_FUNCTION_LINES = 60  # from the `def` line to the last line of the body, decorators excluded
MAX_POSITIONAL = 3  # parameters a function takes by position, self/cls not counted
# Signatures that someone else calls positionally keep their positional parameters, each for a reason:
POSITIONAL_ALLOWED = {
    # a Jinja filter with transformers' signature: Hub chat templates may pass its options by position
    ("lmforge.data.chat_template", "_compile.tojson"),
    # PyTorch calls a TorchFunctionMode with (func, types, args, kwargs), by position
    ("lmforge.inference.weights", "_NoInitOnMeta.__torch_function__"),
    # autograd.Function.apply hands (ctx, *inputs) to forward by position
    ("lmforge.model.gpt", "_FusedRMSNorm.forward"),
}
TRAINING = "lmforge.train"
MAY_IMPORT_TRAINING = ("lmforge.train", "lmforge.cli", "lmforge.__main__")

Graph = Mapping[str, Iterable[str]]  # module -> the modules it imports

# The one written order of lmforge's packages, lowest layer first (README.md's "Layout" gives it in
# words): a package imports only packages on lower layers, never one above it and never another
# package of its own layer; packages that share a layer are independent. A package is a subpackage
# (all its modules) or a tuple of top-level modules that work as one: the base modules import each
# other (the cycle rule keeps them in order), and `python -m lmforge` is the command line.
BASE = (
    "lmforge",
    "lmforge.errors",
    "lmforge.jsonl",
    "lmforge.config",
    "lmforge.runtime",
    "lmforge.staging",
    "lmforge.words",
    "lmforge.stats",
    "lmforge.targets",
    "lmforge.files",
    "lmforge.run_folder",
    "lmforge.output",
    "lmforge.progress",
    "lmforge.recipes",
)
COMMAND_LINE = ("lmforge.cli", "lmforge.__main__")
LAYERS: list[tuple[str | tuple[str, ...], ...]] = [
    (BASE,),
    ("lmforge.data", "lmforge.model"),
    ("lmforge.checkpoint", "lmforge.report"),
    ("lmforge.inference",),
    ("lmforge.train",),
    ("lmforge.chat", "lmforge.tasks"),
    ("lmforge.eval",),
    ("lmforge.serve", "lmforge.interop"),
    (COMMAND_LINE,),
]


# ----------------------------------------------------------------------------- reading the source


def module_name(path: Path) -> str:
    """`src/lmforge/data/loader.py` -> `lmforge.data.loader`; a package is its `__init__.py`."""
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def modules() -> dict[str, Path]:
    """Every module of the lmforge package, by dotted name."""
    return {module_name(path): path for path in sorted((SRC / "lmforge").rglob("*.py"))}


@functools.cache
def syntax_tree(module: str) -> ast.Module:
    path = modules()[module]
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def resolve_from(module: str, package: bool, node: ast.ImportFrom) -> str:
    """The module that `from X import ...` in `module` names, a relative X made absolute.

    `.` is the package that holds `module`, or `module` itself when it is a package.
    """
    if node.level == 0:
        return node.module or ""
    parts = module.split(".") if package else module.split(".")[:-1]
    base = parts[: len(parts) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, package: bool, tree: ast.AST, known: set[str]) -> dict[str, int]:
    """The lmforge modules that `module` imports, anywhere in it (functions included), with a line.

    `import a.b` imports a.b; `from a import b` imports a.b when that is a module, else a. The
    parent packages that Python runs on the way are not counted: they are not this module's choice.
    """
    found: dict[str, int] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = resolve_from(module, package, node)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            if target in known and target != module:
                found[target] = min(found.get(target, node.lineno), node.lineno)
    return found


@functools.cache
def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported module: line of its first import}, for every lmforge module."""
    known = set(modules())
    return {
        module: imports_of(module, path.name == "__init__.py", syntax_tree(module), known)
        for module, path in modules().items()
    }


def location(module: str, line: int) -> str:
    return f"{modules()[module].relative_to(REPO)}:{line}"


# ----------------------------------------------------------------------------- the checks


def long_functions(tree: ast.AST, limit: int) -> list[tuple[str, int, int]]:
    """(qualified name, line, length) of every function or method longer than `limit` lines."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                if not isinstance(child, ast.ClassDef):
                    length = child.end_lineno - child.lineno + 1  # lineno is the `def`, not a decorator
                    if length > limit:
                        found.append((name, child.lineno, length))
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


def positional_heavy(tree: ast.AST, limit: int) -> list[tuple[str, int, int]]:
    """(qualified name, line, count) of every function or method that takes more than `limit`
    parameters by position, a leading self or cls not counted (*args is not a parameter here)."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                if not isinstance(child, ast.ClassDef):
                    names = [a.arg for a in child.args.posonlyargs + child.args.args]
                    count = len(names) - (names[:1] in (["self"], ["cls"]))
                    if count > limit:
                        found.append((name, child.lineno, count))
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


def find_cycles(graph: Graph) -> list[list[str]]:
    """One cycle per strongly connected group of modules, as [a, b, ..., a]."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def connect(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group: set[str] = set()
            member = None
            while member != node:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
            if len(group) > 1 or node in graph.get(node, ()):
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [shortest_cycle(min(group), group, graph) for group in groups]


def shortest_cycle(start: str, group: set[str], graph: Graph) -> list[str]:
    """The shortest path from `start` back to itself, through modules of its group."""
    previous: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return [*reversed(path), start]
            if nxt in group and nxt not in previous:
                previous[nxt] = node
                queue.append(nxt)
    raise AssertionError(f"{start} is in no cycle")  # a strongly connected group always has one


def within(module: str, package: str) -> bool:
    """`module` is `package` or one of its submodules."""
    return module == package or module.startswith(package + ".")


def top_level(module: str) -> str:
    """`lmforge.data.loader` -> `lmforge.data`: the subpackage or top-level module that holds it."""
    return ".".join(module.split(".")[:2])


def layer_violations(graph: Graph, layers: list[tuple[str | tuple[str, ...], ...]]) -> list[tuple[str, str]]:
    """(module, imported module) for every import of a package on a higher layer or of another
    package on the same layer. A module whose top level is on no layer is paired with itself."""
    place: dict[str, tuple[int, str]] = {}  # top level -> (layer, the package it belongs to)
    for layer, packages in enumerate(layers):
        for package in packages:
            members = (package,) if isinstance(package, str) else package
            place.update((member, (layer, members[0])) for member in members)
    found = []
    for module, targets in graph.items():
        if top_level(module) not in place:
            found.append((module, module))
            continue
        layer, package = place[top_level(module)]
        for target in targets:
            target_layer, target_package = place.get(top_level(target), (len(layers), "?"))
            if target_layer > layer or (target_layer == layer and target_package != package):
                found.append((module, target))
    return found


# ----------------------------------------------------------------------------- the rules


def test_no_function_is_longer_than_the_limit() -> None:
    offenders = [
        f"{location(module, line)} {name} is {length} lines"
        for module in modules()
        for name, line, length in long_functions(syntax_tree(module), MAX_FUNCTION_LINES)
    ]
    assert not offenders, f"functions longer than {MAX_FUNCTION_LINES} lines:\n" + "\n".join(offenders)


def test_no_function_takes_more_than_three_parameters_by_position() -> None:
    offenders = [
        f"{location(module, line)} {name} takes {count} parameters by position"
        for module in modules()
        for name, line, count in positional_heavy(syntax_tree(module), MAX_POSITIONAL)
        if (module, name) not in POSITIONAL_ALLOWED
    ]
    assert not offenders, (
        f"functions with more than {MAX_POSITIONAL} positional parameters (make the rest keyword-only, "
        "after a `*`):\n" + "\n".join(offenders)
    )
    allowed_and_present = {
        (module, name) for module in modules() for name, _, _ in positional_heavy(syntax_tree(module), 0)
    }
    assert POSITIONAL_ALLOWED <= allowed_and_present, "the allow-list names a function that is gone"


def test_the_modules_import_each_other_without_a_cycle() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_inference_code_imports_nothing_from_training() -> None:
    offenders = [
        f"{location(module, line)} {module} imports {target}"
        for module, targets in import_graph().items()
        if not any(within(module, allowed) for allowed in MAY_IMPORT_TRAINING)
        for target, line in targets.items()
        if within(target, TRAINING)
    ]
    assert not offenders, "only training and the command line may import lmforge.train:\n" + "\n".join(
        offenders
    )


def test_data_imports_nothing_from_the_model() -> None:
    offenders = [
        f"{location(module, line)} {module} imports {target}"
        for module, targets in import_graph().items()
        if within(module, "lmforge.data")
        for target, line in targets.items()
        if within(target, "lmforge.model")
    ]
    assert not offenders, "data must not import the model:\n" + "\n".join(offenders)


def test_packages_import_only_packages_on_lower_layers() -> None:
    graph = import_graph()
    offenders = [
        f"{location(module, graph[module][target])} {module} imports {target}"
        if target != module
        else f"{location(module, 1)} {module} is on no layer of LAYERS"
        for module, target in layer_violations(graph, LAYERS)
    ]
    assert not offenders, "imports against the layer order (LAYERS):\n" + "\n".join(offenders)


def test_pyproject_configures_ruff_with_a_line_length() -> None:
    ruff = tomllib.loads((REPO / "pyproject.toml").read_text()).get("tool", {}).get("ruff", {})
    assert isinstance(ruff.get("line-length"), int)


# ----------------------------------------------------------------------------- the checks themselves


def test_every_module_is_found_and_imports_resolve_as_python_resolves_them() -> None:
    graph = import_graph()
    some = {"lmforge", "lmforge.__main__", "lmforge.data", "lmforge.data.loader", "lmforge.model.gpt"}
    assert some <= graph.keys()
    assert "lmforge.data.tokenizer" in graph["lmforge.data.loader"]  # from lmforge.data.tokenizer import f
    assert "lmforge.data.loader" in graph["lmforge.data"]  # a package is its __init__.py
    assert "lmforge.data" not in graph["lmforge.data.loader"]  # parent packages are not counted


def test_imports_inside_functions_and_relative_imports_are_counted() -> None:
    known = {"pkg", "pkg.a", "pkg.other", "pkg.sub", "pkg.sub.b", "pkg.sub.c"}
    source = "import os\ndef f():\n    from . import c\n    from .. import a\n    from ..other import name\n"
    tree = ast.parse(source + "    import pkg.sub\n")
    expected = {"pkg.sub.c": 3, "pkg.a": 4, "pkg.other": 5, "pkg.sub": 6}
    assert imports_of("pkg.sub.b", False, tree, known) == expected
    tree = ast.parse("from .sub import helper\nfrom pkg.sub import b\n")
    assert imports_of("pkg", True, tree, known) == {"pkg.sub": 1, "pkg.sub.b": 2}  # a package's . is itself


def test_a_long_function_and_a_cycle_are_reported() -> None:
    method = "class A:\n    @property\n    def f(self):\n" + "        x = 1\n" * 61  # 62 lines from the def
    tree = ast.parse(method + "def g():\n    pass\n")
    assert long_functions(tree, 60) == [("A.f", 3, 62)]
    signatures = "class B:\n    def m(self, a, b, c, d=0): ...\n    def k(self, a, b, c, *, d=0): ...\n"
    tree = ast.parse(signatures + "def h(a, b, /, c, d, *args): ...\ndef s(cls, a, b): ...\n")
    assert positional_heavy(tree, 3) == [("B.m", 2, 4), ("h", 4, 4)]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set(), "c": {"c"}}) == [["c", "c"]]
    assert within("lmforge.train.trainer", TRAINING) and not within("lmforge.training_data", TRAINING)


def test_an_import_upwards_or_across_a_layer_is_reported() -> None:
    layers = [(("p", "p.base"),), ("p.a", "p.b"), ("p.top",)]
    graph = {
        "p.base": {"p"},  # within the base package: allowed
        "p.a.x": {"p.a.y", "p.base", "p.b.z"},  # its own package and lower: allowed; p.b: across
        "p.a.y": {"p.top"},  # upwards
        "p.b.z": set(),
        "p.top": {"p.a.x", "p.b"},  # downwards: allowed
        "p.new": set(),  # on no layer
    }
    assert layer_violations(graph, layers) == [("p.a.x", "p.b.z"), ("p.a.y", "p.top"), ("p.new", "p.new")]
