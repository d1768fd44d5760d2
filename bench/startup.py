"""python bench/startup.py [--repeats 7] [--smoke] [--write]

Does having libtpu installed (the test extra brings it, to compile for TPUs) slow or clutter an ordinary run on a
machine without a TPU? Each variant is a fresh process doing what a script's start does: `cli.setup_process`,
then jax picks its backend (`jax.devices()`), with no JAX_PLATFORMS or TPU_* variable set:
  without  libtpu made unimportable (sys.modules["libtpu"] = None, as if it were not installed)
  with     libtpu installed, our process setup (jax picks the backend; what libtpu prints looking for an absent
           chip is kept off the terminal)
  bare     libtpu installed, plain `import jax; jax.devices()` with no setup: what the setup keeps quiet
The variants run interleaved, `--repeats` times each; the table gives median wall seconds, the backend chosen and
the stderr lines printed. Last line: `with_over_without <median ratio> with_stderr_lines <n> bare_stderr_lines <n>`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETUP = ("import argparse, sys; sys.path.insert(0, {root!r}); from tpu_wan import cli; "
         "cli.setup_process(argparse.Namespace()); ")
VARIANTS = {
    "without": "import sys; sys.modules['libtpu'] = None; " + SETUP + "import jax; print(jax.devices()[0].platform)",
    "with": SETUP + "import jax; print(jax.devices()[0].platform)",
    "bare": "import jax; print(jax.devices()[0].platform)",
}


def run(code: str, env: dict) -> tuple[float, str, int]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code.format(root=str(ROOT))], env=env, capture_output=True,
                          text=True, check=True)
    return time.perf_counter() - start, proc.stdout.strip(), len(proc.stderr.splitlines())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--smoke", action="store_true", help="one run of each")
    parser.add_argument("--write", action="store_true", help="write the table into bench/README.md")
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS" and not k.startswith("TPU_")}
    results = {name: [] for name in VARIANTS}
    for _ in range(1 if args.smoke else args.repeats):
        for name, code in VARIANTS.items():
            results[name].append(run(code, env))
    table = ["| variant | median s | backend | stderr lines |", "|---|---|---|---|"]
    table += [f"| {name} | {statistics.median(r[0] for r in runs):.3f} | {runs[0][1]} | {max(r[2] for r in runs)} |"
              for name, runs in results.items()]
    print(*table, sep="\n")
    if args.write and not args.smoke:
        sys.path.insert(0, str(ROOT / "bench"))
        from doc_tables import provenance, write_block

        write_block("startup", "\n".join(table), provenance())
    median = {name: statistics.median(r[0] for r in runs) for name, runs in results.items()}
    lines = {name: max(r[2] for r in runs) for name, runs in results.items()}
    print(f"with_over_without {median['with'] / median['without']:.3f} with_stderr_lines {lines['with']} "
          f"bare_stderr_lines {lines['bare']}")


if __name__ == "__main__":
    main()
