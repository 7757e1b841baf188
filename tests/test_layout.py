"""The package's shape, checked from its source: no import cycle (imports inside functions
counted, ``TYPE_CHECKING`` blocks not), OpenTelemetry's private names in one module only, and no
module over 500 lines."""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "telemetry")
#: modules over the limit, each with the reason it is still there
OVERSIZE: dict[str, str] = {}
MAX_LINES = 500


def _modules() -> dict[str, str]:
    out = {}
    for dirpath, _dirs, files in os.walk(PACKAGE):
        if "__pycache__" in dirpath:
            continue
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                mod = os.path.relpath(path[:-3], ROOT).replace(os.sep, ".").removesuffix(".__init__")
                out[mod] = path
    return out


def _imports(mod: str, path: str, modules: dict[str, str]) -> set[str]:
    with open(path) as fh:
        tree = ast.parse(fh.read())
    skip: set[int] = set()
    for node in ast.walk(tree):  # `if TYPE_CHECKING:` blocks import nothing at run time
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    package = mod if path.endswith("__init__.py") else mod.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(max(0, node.level - 1)):
                base = base.rsplit(".", 1)[0]
            target = (base + ("." + node.module if node.module else "")) if node.level else (node.module or "")
            for alias in node.names:
                full = f"{target}.{alias.name}"
                out.add(full if full in modules else target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m in modules and m != mod and m != "telemetry"}


def test_no_import_cycle():
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for dep in sorted(graph[m]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_cycle_check_can_fail(tmp_path):
    """The same graph walk finds a cycle planted between two modules."""
    (tmp_path / "a.py").write_text("from . import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from . import a\n")
    modules = {"pkg.a": str(tmp_path / "a.py"), "pkg.b": str(tmp_path / "b.py")}
    assert _imports("pkg.a", modules["pkg.a"], modules) == {"pkg.b"}
    assert _imports("pkg.b", modules["pkg.b"], modules) == {"pkg.a"}  # an import inside a function counts


def test_opentelemetry_private_names_only_in_one_module():
    for mod, path in _modules().items():
        if mod == "telemetry._core.otel_private":
            continue
        with open(path) as fh:
            tree = ast.parse(fh.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("opentelemetry"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private and "._" not in (node.module or ""), (mod, node.module, private)


def test_module_sizes():
    over = {}
    for path in _modules().values():
        with open(path) as fh:
            n = sum(1 for _ in fh)
        if n > MAX_LINES:
            over[os.path.basename(path)] = n
    assert set(over) == set(OVERSIZE), over
