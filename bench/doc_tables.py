"""Measured tables in the docs, written by the bench that measured them: each sits between a pair of markers
(`<!-- name:start -->`, `<!-- name:end -->`) under a first line naming the commit it was measured at, the date
and the command, so a table cannot go stale without saying how old it is (tests/test_docs.py checks every marked
block names a commit of this repository)."""

from __future__ import annotations

import datetime
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def current_commit() -> str:
    """HEAD's short hash, with ' with uncommitted changes' where the tracked files other than the docs differ
    from it (a bench's own earlier write into a .md file does not change the code it measures)."""
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT).stdout.strip()

    commit = git("rev-parse", "--short=10", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)*.md")
    return commit + (" with uncommitted changes" if dirty else "")


def this_command() -> str:
    return "python " + " ".join([str(Path(sys.argv[0]).resolve().relative_to(ROOT)), *sys.argv[1:]])


def provenance(commit: str | None = None, date: str | None = None, command: str | None = None) -> str:
    """'Measured at commit <sha> (<date>) by `<command>`.': by default HEAD, today and this process's command; a
    bench that renders measurements kept from an earlier run passes the commit and date they were made at."""
    return (f"Measured at commit {commit or current_commit()} ({date or datetime.date.today().isoformat()}) by "
            f"`{command or this_command()}`.")


def stamp() -> dict:
    """What a bench keeps with each measurement, for measured_line."""
    return {"commit": current_commit(), "date": datetime.date.today().isoformat(), "command": this_command()}


def measured_line(documents: list[dict]) -> str:
    """The provenance of measurements kept with stamp() (in a document's "measured_at"): their commits, dates and
    commands."""
    stamps = [d.get("measured_at") or {"commit": "unknown", "date": "unknown", "command": "unknown"} for d in documents]
    commits = list(dict.fromkeys(s["commit"] for s in stamps))
    dates = sorted({s["date"] for s in stamps})
    commands = list(dict.fromkeys(s["command"] for s in stamps))
    when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
    return (f"Measured at commit {', '.join(commits)} ({when}) by " + "; ".join(f"`{c}`" for c in commands) + ".")


def write_block(name: str, text: str, line: str, document: Path = ROOT / "bench" / "README.md") -> None:
    """Puts `text` (a markdown table), under `line` (its provenance), between `name`'s markers in `document`."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    content = document.read_text()
    i, j = content.index(start) + len(start), content.index(end)
    document.write_text(content[:i] + "\n" + line + "\n\n" + text + "\n" + content[j:])


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    """A markdown table: the header, its rule, one line a row."""
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(row) + " |" for row in rows])
