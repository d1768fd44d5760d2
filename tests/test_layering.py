"""The package's import structure against the layers docs/ARCHITECTURE.md declares: read from the source with
ast (nothing is imported or run), function-level imports included."""

import ast
import re
from pathlib import Path

from scripts import ROOT

PACKAGE = ROOT / "tpu_wan"


def declared_layers() -> dict[str, int]:
    """module (dotted, without 'tpu_wan.') -> layer number, from the table between the layers markers."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    table = text[text.index("<!-- layers:start -->"):text.index("<!-- layers:end -->")]
    layers = {}
    for number, modules in re.findall(r"^\| (\d+) \w+ \| (.+) \|$", table, flags=re.M):
        for module in re.findall(r"`([\w.]+)`", modules):
            assert module not in layers, f"{module} is in two layers"
            layers[module] = int(number)
    return layers


def imports(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the tpu_wan modules (or subpackages) it imports anywhere in its source; packages' __init__
    files hold no code here and are left out."""
    graph = {}
    for path in sorted(package.rglob("*.py")):
        if path.name == "__init__.py":
            assert not path.read_text(encoding="utf-8").strip(), f"{path}: expected an empty package marker"
            continue
        name = ".".join(path.relative_to(package).with_suffix("").parts)
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tpu_wan":
                if node.module == "tpu_wan":
                    found |= {a.name for a in node.names}
                else:
                    found.add(node.module.removeprefix("tpu_wan."))
            elif isinstance(node, ast.Import):
                found |= {a.name.removeprefix("tpu_wan.") for a in node.names if a.name.split(".")[0] == "tpu_wan"}
        graph[name] = {m for m in found if m != name}
    return graph


def _resolve(target: str, layers: dict[str, int]) -> str:
    """`kernels` (the package) stands for its modules."""
    return target if target in layers else next((m for m in layers if m.startswith(target + ".")), target)


def test_every_module_has_a_layer():
    layers, graph = declared_layers(), imports()
    assert sorted(set(graph) - set(layers)) == [], "modules missing from docs/ARCHITECTURE.md's layers table"
    assert sorted(set(layers) - set(graph)) == [], "the layers table names modules that do not exist"


def test_imports_go_down_or_sideways_only():
    layers = declared_layers()
    upward = [f"{m} (layer {layers[m]}) imports {t} (layer {layers[_resolve(t, layers)]})"
              for m, targets in imports().items() for t in targets if layers[_resolve(t, layers)] > layers[m]]
    assert upward == []


def test_nothing_imports_the_cli_and_only_attention_imports_the_kernels():
    graph = imports()
    assert [m for m, targets in graph.items() if "cli" in targets] == []
    assert [m for m, targets in graph.items() if any(t.split(".")[0] == "kernels" for t in targets)
            and m.split(".")[0] != "kernels"] == ["attention"]


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
    layers = declared_layers()
    assert find_cycle({m: {_resolve(t, layers) for t in ts} for m, ts in imports().items()}) is None


def test_the_walk_sees_function_level_imports_and_cycles(tmp_path):
    # The checks above are only as good as the walk: a lazy import inside a function counts, and so does a cycle.
    (tmp_path / "a.py").write_text("def f():\n    from tpu_wan import b, cli\n")
    (tmp_path / "b.py").write_text("import tpu_wan.a\nfrom tpu_wan.kernels import splash_exp2\n")
    graph = imports(tmp_path)
    assert graph == {"a": {"b", "cli"}, "b": {"a", "kernels"}}
    assert find_cycle(graph) == ["a", "b", "a"]
