"""The package's layering: no import circles, and no module importing one that stands above it.

The layer order is the list in docs/architecture.md (the block after "## Layers"), read here, so
the page a newcomer reads first and this test cannot disagree. Imports are read from the source
with `ast`, those inside functions included (a lazy import is still a dependency); imports under
`if TYPE_CHECKING:` are left out (they never run).
"""

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "slmctl"
ARCHITECTURE = REPO / "docs" / "architecture.md"


def read_layers(text: str) -> list[list[str]]:
    """The layers of docs/architecture.md, top first: each a list of module names (a name covers
    its submodules unless a more specific name is listed elsewhere)."""
    section = text.split("## Layers", 1)[1]
    block = section.split("```", 2)[1]
    layers = []
    for line in block.splitlines():
        names = line.split("#", 1)[0].split()
        if names:
            layers.append(names)
    return layers


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Line numbers of imports under `if TYPE_CHECKING:`."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                lines.update(n.lineno for n in ast.walk(inner) if hasattr(n, "lineno"))
    return lines


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the slmctl modules it imports (a `from pkg import name` that names a submodule
    counts as importing that submodule, else the package itself)."""
    modules = {module_name(p, package.parent): p for p in package.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_lines(tree)
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.split(".")[0] == "slmctl")
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[: len(here.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != "slmctl":
                    continue
                for alias in node.names:
                    submodule = f"{target}.{alias.name}"
                    targets.add(submodule if submodule in modules else target)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def layer_of(module: str, layers: list[list[str]]) -> int:
    """Index of the layer whose most specific name covers `module` (0 = top)."""
    best, depth = None, -1
    for index, names in enumerate(layers):
        for name in names:
            if (module == name or module.startswith(name + ".")) and name.count(".") > depth:
                best, depth = index, name.count(".")
    if best is None:
        raise AssertionError(f"{module} is in no layer of {ARCHITECTURE.name}: add it to the list under '## Layers'")
    return best


def upward_imports(graph: dict[str, set[str]], layers: list[list[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                  if layer_of(b, layers) < layer_of(a, layers))


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


@pytest.fixture(scope="module")
def layers():
    return read_layers(ARCHITECTURE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_no_import_circles(graph):
    assert circles(graph) == []


def test_no_module_imports_one_above_it(graph, layers):
    assert upward_imports(graph, layers) == []


def test_every_module_has_a_layer(graph, layers):
    for module in graph:
        layer_of(module, layers)


def test_the_checks_see_a_circle_and_an_upward_import(tmp_path, layers):
    """The graph reader and both checks on a made-up package: a lazy import that closes a circle,
    and an import from a lower layer up."""
    package = tmp_path / "slmctl"
    (package / "model").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "model" / "__init__.py").write_text("")
    (package / "errors.py").write_text("from slmctl.model.directory import load\n")
    (package / "model" / "directory.py").write_text("def load():\n    from slmctl import errors\n")
    graph = import_graph(package)
    assert circles(graph) == [["slmctl.errors", "slmctl.model.directory"]]
    assert "slmctl.errors -> slmctl.model.directory" in upward_imports(graph, layers)

