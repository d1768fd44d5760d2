"""The docs name only what exists: every `module.name` of tpu_wan they mention resolves."""

import importlib
import pkgutil
import re

import pytest
from scripts import ROOT

import tpu_wan

# A module by its name (`pipeline.run_stage2`) or its path (`tpu_wan.run.pipeline`): names are unique across folders.
MODULES = {m.name.rsplit(".", 1)[-1]: m.name for m in pkgutil.walk_packages(tpu_wan.__path__, "tpu_wan.")}
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), ROOT / "bench" / "README.md"])


def _named(text):
    """(module, attribute path) for each `module.attr[.attr]` in backticks whose module is one of ours."""
    for code in re.findall(r"`([^`\n]+)`", text):
        for module, attrs in re.findall(r"(?<![\w./])(?:tpu_wan\.)?([a-z_0-9]+)\.([A-Za-z_][\w.]*)", code):
            if module in MODULES and not attrs.endswith(("py", "json", "md")):
                yield module, attrs


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_named_attribute_exists(doc):
    missing = []
    for module, attrs in _named(doc.read_text()):
        obj = importlib.import_module(MODULES[module])
        for name in attrs.split("."):
            if not hasattr(obj, name) and hasattr(obj, "__path__"):  # a package: its submodule by that name
                try:
                    importlib.import_module(f"{obj.__name__}.{name}")
                except ModuleNotFoundError:
                    pass
            if not hasattr(obj, name):
                missing.append(f"{module}.{attrs}")
                break
            obj = getattr(obj, name)
    assert not missing, f"{doc.name} names what does not exist: {sorted(set(missing))}"


# Where every table is a measurement: each must sit in a marked block that names the commit it was measured at.
MEASUREMENT_DOCS = (ROOT / "bench" / "README.md", ROOT / "docs" / "MEMORY.md")
_BLOCK = re.compile(r"<!-- ([\w-]+):start -->\n(.*?)<!-- \1:end -->", re.S)
# Tables of data, not measurements (tests/test_layering.py reads "layers"; the bench index lists the benches).
STRUCTURAL_BLOCKS = {"layers", "bench_index"}
_PROVENANCE = re.compile(r"^(?:Measured|Written) at commits? ((?:[0-9a-f]{7,40}(?:, | and )?)+)")


def _git(*args):
    import subprocess

    return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_measured_table_names_the_commit_it_was_measured_at(doc):
    text = doc.read_text()
    blocks = _BLOCK.findall(text)
    assert text.count(":start -->") == len(blocks), f"{doc.name}: a block marker without its pair"
    # a shallow clone lacks the older commits: then only the form is checked
    history = _git("rev-parse", "--is-shallow-repository").stdout.strip() == "false"
    for name, body in blocks:
        if name in STRUCTURAL_BLOCKS:
            continue
        first = body.strip().splitlines()[0]
        assert "\n|" in body, f"{doc.name} block {name}: expected a table"
        if first.startswith("Not measured yet"):
            continue
        match = _PROVENANCE.match(first)
        assert match, f"{doc.name} block {name}: expected 'Measured at commit <sha> ...' first, found {first[:80]!r}"
        for sha in re.findall(r"[0-9a-f]{7,40}", match.group(1)):
            assert not history or _git("cat-file", "-e", f"{sha}^{{commit}}").returncode == 0, (
                f"{doc.name} block {name}: commit {sha} is not in this repository")
    if doc in MEASUREMENT_DOCS:
        outside = _BLOCK.sub("", text)
        tables = [line for line in outside.splitlines() if line.startswith("|") and line.rstrip().endswith("|")]
        assert not tables, f"{doc.name}: a table outside the marked blocks: {tables[0][:80]!r}"
