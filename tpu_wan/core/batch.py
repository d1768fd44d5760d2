"""Many videos from one run: prompt files, seed lists, video names and batches.

A run makes one video per (prompt, seed), prompts outer. Each video has a stable, filesystem-safe name
`<prompt-slug>_seed<seed>` used for its latents and its mp4. Videos are grouped into fixed-size batches
(the last one padded by repeating a video) so one compiled program serves the whole sweep.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import unicodedata
from pathlib import Path
from typing import Sequence

from tpu_wan.core.errors import BatchError

log = logging.getLogger("tpu_wan")
SLUG_MAX = 48


@dataclasses.dataclass(frozen=True)
class Video:
    """One output video: which prompt (index into the prompt list), which seed, and its file name stem."""

    prompt_index: int
    seed: int
    name: str


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts, one per line (UTF-8); blank lines and lines starting with '#' are skipped."""
    return read_lines(path, "--prompt_file", "prompt")


def read_lines(path: str | Path, flag: str, what: str) -> list[str]:
    """The non-blank lines of a UTF-8 list file (prompts, image paths) not starting with '#', stripped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte order mark (Windows editors) is not part of a line
    except FileNotFoundError:
        raise BatchError(f"{flag}: expected a file, found nothing at {path}") from None
    except UnicodeDecodeError as err:
        raise BatchError(f"{flag} {path}: expected UTF-8 text, found invalid byte at offset {err.start}") from None
    except OSError as err:  # a folder, no permission, ...
        raise BatchError(f"{flag} {path}: expected a readable text file, found {err.strerror}") from None
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise BatchError(f"{flag} {path}: expected at least one {what} line, found none")
    return lines


def parse_seeds(values: Sequence[str]) -> list[int]:
    """['1', '2', '5-8'] -> [1, 2, 5, 6, 7, 8]; ranges are inclusive; duplicates are refused."""
    seeds = []
    for value in values:
        match = re.fullmatch(r"(\d+)-(\d+)", value)
        if match:
            lo, hi = int(match[1]), int(match[2])
            if hi < lo:
                raise BatchError(f"--seeds: expected a range low-high with low <= high, found {value!r}")
            seeds.extend(range(lo, hi + 1))
        elif re.fullmatch(r"\d+", value):
            seeds.append(int(value))
        else:
            raise BatchError(f"--seeds: expected non-negative integers or ranges like 1-8, found {value!r}")
    if len(set(seeds)) != len(seeds):
        raise BatchError(f"--seeds: expected each seed once, found duplicates in {values}")
    return seeds


def slugify(prompt: str) -> str:
    """Lowercase ASCII words of the prompt joined by '-', at most SLUG_MAX characters ('prompt' if none)."""
    ascii_text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode()
    words = re.findall(r"[a-z0-9]+", ascii_text.lower())
    slug = ""
    for word in words:
        candidate = f"{slug}-{word}" if slug else word
        if len(candidate) > SLUG_MAX:
            break
        slug = candidate
    return slug or "prompt"


def prompt_slugs(prompts: Sequence[str]) -> list[str]:
    """One slug per prompt, unique within the list. In order of appearance, a prompt whose slug is taken gets
    the first free one of slug-2, slug-3, ... ('a cat', 'a cat 2', 'a cat' -> a-cat, a-cat-2, a-cat-3), so a
    prompt's name depends only on the prompts before it: the same list, or a longer one, names it the same."""
    taken: set[str] = set()
    next_suffix: dict[str, int] = {}  # per slug, where the search for a free suffix resumes
    slugs = []
    for prompt in prompts:
        slug = base = slugify(prompt)
        n = next_suffix.get(base, 2)
        while slug in taken:
            slug, n = f"{base}-{n}", n + 1
        next_suffix[base] = n
        taken.add(slug)
        slugs.append(slug)
    return slugs


def plan_videos(prompts: Sequence[str], seeds: Sequence[int]) -> list[Video]:
    """Every (prompt, seed) pair, prompts outer, with its file name stem."""
    return [
        Video(i, seed, f"{slug}_seed{seed}") for i, slug in enumerate(prompt_slugs(prompts)) for seed in seeds
    ]


def default_batch_size(dp: int, cfg: bool) -> int:
    """Videos per batch the mesh holds at no extra cost: the dp axis holds dp rows and a video takes two (the
    cond/uncond pair) under CFG. A smaller batch would leave dp shards idle; padding up to this is free."""
    return max(1, dp // 2 if cfg else dp)


def batches(videos: Sequence[Video], batch_size: int) -> list[list[Video]]:
    """Consecutive groups of `batch_size` videos (the last may be shorter; callers pad it)."""
    if batch_size < 1:
        raise BatchError(f"--batch_size must be >= 1, found {batch_size}")
    return [list(videos[i : i + batch_size]) for i in range(0, len(videos), batch_size)]
