"""The package's import structure against the layers docs/ARCHITECTURE.md declares: read from the source with
ast (nothing is imported or run), function-level imports included."""

import ast
import re
from pathlib import Path

import pytest
from scripts import ROOT

PACKAGE = ROOT / "tpu_wan"


def declared_layers() -> dict[str, int]:
    """folder (or top-level module) of tpu_wan -> layer number, from the table between the layers markers."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    table = text[text.index("<!-- layers:start -->"):text.index("<!-- layers:end -->")]
    layers = {}
    for number, folders in re.findall(r"^\| (\d+) \w+ \| (.+) \|$", table, flags=re.M):
        for folder in re.findall(r"`([\w.]+)/?`", folders):
            assert folder not in layers, f"{folder} is in two layers"
            layers[folder] = int(number)
    return layers


def _is_docstring_only(path: Path) -> bool:
    body = ast.parse(path.read_text(encoding="utf-8")).body
    return all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)
               for n in body)


def imports(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module ('folder.module', or 'module' at the top) -> the tpu_wan modules (or folders) it imports anywhere in
    its source; a package's __init__ holds its docstring only and is left out."""
    modules = {".".join(p.relative_to(package).with_suffix("").parts) for p in package.rglob("*.py")
               if p.name != "__init__.py"}
    graph = {}
    for path in sorted(package.rglob("*.py")):
        if path.name == "__init__.py":
            assert _is_docstring_only(path), f"{path}: expected a package docstring and no code"
            continue
        name = ".".join(path.relative_to(package).with_suffix("").parts)
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tpu_wan":
                base = node.module.removeprefix("tpu_wan").removeprefix(".")
                for alias in node.names:  # `from tpu_wan.core import errors`: the module core.errors
                    target = f"{base}.{alias.name}" if base else alias.name
                    found.add(target if target in modules else base or alias.name)
            elif isinstance(node, ast.Import):
                found |= {a.name.removeprefix("tpu_wan.") for a in node.names if a.name.split(".")[0] == "tpu_wan"}
        graph[name] = {m for m in found if m != name}
    return graph


def layer_of(module: str, layers: dict[str, int]) -> int:
    """A module's layer is its folder's (a top-level module's, its own)."""
    return layers[module.split(".")[0]]


def test_every_module_is_in_a_layer_folder():
    layers, graph = declared_layers(), imports()
    assert sorted(m for m in graph if m.split(".")[0] not in layers) == [], (
        "modules outside the folders of docs/ARCHITECTURE.md's layers table")
    assert sorted(set(layers) - {m.split(".")[0] for m in graph}) == [], "the layers table names what does not exist"


def test_imports_go_down_or_sideways_only():
    layers = declared_layers()
    upward = [f"{m} (layer {layer_of(m, layers)}) imports {t} (layer {layer_of(t, layers)})"
              for m, targets in imports().items() for t in targets if layer_of(t, layers) > layer_of(m, layers)]
    assert upward == []


def test_nothing_imports_the_cli_and_only_the_attention_dispatch_calls_the_kernel():
    graph = imports()
    assert [m for m, targets in graph.items() if "cli" in targets] == []
    assert [m for m, targets in graph.items() if "kernels.splash_exp2" in targets
            and m.split(".")[0] != "kernels"] == ["runtime.attention"]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as [a, b, ..., a], or None."""
    visiting, done = [], set()

    def visit(m):
        if m in visiting:
            return visiting[visiting.index(m):] + [m]
        if m in done:
            return None
        visiting.append(m)
        for t in sorted(graph.get(m, ())):
            if cycle := visit(t):
                return cycle
        visiting.pop()
        done.add(m)
        return None

    return next((c for m in sorted(graph) if (c := visit(m))), None)


def test_no_import_cycle():
    assert find_cycle(imports()) is None


def test_the_walk_sees_function_level_imports_and_cycles(tmp_path):
    # The checks above are only as good as the walk: a lazy import inside a function counts, and so does a cycle.
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "__init__.py").write_text('"""docstring"""\n')
    (tmp_path / "core" / "a.py").write_text("def f():\n    from tpu_wan.core import b\n    from tpu_wan import cli\n")
    (tmp_path / "core" / "b.py").write_text("import tpu_wan.core.a\nfrom tpu_wan.kernels import splash_exp2\n")
    graph = imports(tmp_path)
    assert graph == {"core.a": {"core.b", "cli"}, "core.b": {"core.a", "kernels"}}
    assert find_cycle(graph) == ["core.a", "core.b", "core.a"]
    (tmp_path / "core" / "__init__.py").write_text("import os\n")
    with pytest.raises(AssertionError, match="expected a package docstring and no code"):
        imports(tmp_path)
