"""How every benchmark reports: a table of its figures against the issue targets, and the same as JSON."""

from __future__ import annotations

import json
from pathlib import Path


def print_against_targets(results: dict, targets: dict[str, float]) -> None:
    """One line per figure; those with a target say whether it is met (None: not measured)."""
    print(f"{'metric':28s} {'value':>10s} {'target':>8s}")
    for key, value in results.items():
        target = targets.get(key)
        mark = "" if target is None or value is None else ("  met" if value >= target else "  below")
        shown = f"{value:10.4f}" if isinstance(value, float) else f"{value!s:>10}"
        print(f"{key:28s} {shown} {target if target is not None else '':>8}{mark}")


def write_json(path: str | None, data: dict) -> None:
    """--json FILE: the figures, indented, for scripts and CI (nothing written when no path is given)."""
    if path:
        Path(path).write_text(json.dumps(data, indent=1))


def git_short_head(path: str | Path, fallback: str) -> str:
    """The short commit of the checkout at `path` (what a side-by-side run compared against), else `fallback`
    (for an unpacked archive, which has no .git)."""
    import subprocess

    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return fallback
