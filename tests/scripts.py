"""Running the project's scripts as separate processes, the way users run them."""

import functools
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGE1 = ROOT / "stages" / "stage1_text_encoder.py"
STAGE2 = ROOT / "stages" / "stage2_transformer.py"
STAGE3 = ROOT / "stages" / "stage3_vae_decoder.py"
GENERATE = ROOT / "generate_flax.py"
# Subprocesses get their own 8 virtual CPU devices through the scripts' flag, not the test's environment.
MESH_2x4 = ("--cpu_devices", "8", "--dp", "2", "--tp", "4")


def run(script: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(script), *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{script.name} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def load(script: Path):
    """A script as a module, to call its main() in the test process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"script_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def _script(path: Path):
    return load(path)


def run_in_process(script: Path, argv) -> int:
    """The script's main as its command line runs it (tpu_wan.core.entry), in this process (the test's 8 virtual
    CPU devices; seconds where a new process takes tens); the process settings a script makes (jax's compilation
    cache, environment variables, the SIGTERM handler, a --programs directory) are put back after. Returns the exit
    status."""
    import jax

    from tpu_wan.core import entry
    from tpu_wan.runtime import programs

    jax_settings = {name: getattr(jax.config, name) for name in (
        "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs", "jax_enable_compilation_cache")}
    environment, sigterm = dict(os.environ), signal.getsignal(signal.SIGTERM)
    try:
        return entry.run_main(_script(script).main, [str(a) for a in argv])
    finally:
        for name, value in jax_settings.items():
            jax.config.update(name, value)
        os.environ.clear()
        os.environ.update(environment)
        signal.signal(signal.SIGTERM, sigterm)
        programs.use(None)
