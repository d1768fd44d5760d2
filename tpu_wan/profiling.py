"""Wall-clock timers for the per-stage table generate_flax.py prints."""

from __future__ import annotations

import contextlib
import time


class Timer:
    """Named wall-clock sections, in the order first entered; re-entering a name adds to it."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def table(self) -> str:
        width = max([len(n) for n in self.seconds] + [5])
        rows = [f"{'stage':<{width}}  seconds"] + [f"{n:<{width}}  {s:8.3f}" for n, s in self.seconds.items()]
        return "\n".join(rows)
