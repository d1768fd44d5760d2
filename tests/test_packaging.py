"""What the install promises: the Python versions the pinned wheels exist for, torch's CPU build on TPU hosts."""

import subprocess
import tomllib

from packaging.specifiers import SpecifierSet
from scripts import ROOT


def test_python_versions_with_pinned_wheels_are_accepted():
    # jax 0.10.2 needs 3.11; torch 2.13.0, jaxlib 0.10.2 and libtpu 0.0.42.1 publish wheels for 3.11 to 3.14
    # (newer TPU VM images ship 3.12).
    spec = SpecifierSet(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"])
    assert [v for v in ("3.10", "3.11", "3.12", "3.13", "3.14", "3.15") if v in spec] == ["3.11", "3.12", "3.13", "3.14"]


def _torch_install_line(*make_args):
    out = subprocess.run(["make", "-n", "install", "VENV=/nonexistent-venv", *make_args], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    return next(line for line in out.splitlines() if "pip install" in line and "torch==" in line)


def test_tpu_install_takes_torch_cpu_build():
    # PyPI's default Linux torch wheel is the CUDA build (GBs a TPU host never uses).
    assert "--index-url https://download.pytorch.org/whl/cpu" in _torch_install_line("EXTRAS=tpu")
    assert "--index-url" not in _torch_install_line()  # the test extra: the default index (or a local wheel)
    assert "--index-url https://example.org/whl" in _torch_install_line("EXTRAS=tpu", "TORCH_INDEX=https://example.org/whl")
