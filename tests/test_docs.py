"""The docs name only what exists: every `module.name` of tpu_wan they mention resolves."""

import importlib
import pkgutil
import re

import pytest
from scripts import ROOT

import tpu_wan

MODULES = {m.name for m in pkgutil.iter_modules(tpu_wan.__path__)}
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
        obj = importlib.import_module(f"tpu_wan.{module}")
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
