"""`ovseg-bench accuracy|speed|prompt|soak|tracking|services|demo-runs|precision|sed|ovsam ...`: the project's
benchmarks (each prints a table; --json writes one)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("accuracy", "speed", "prompt", "soak", "tracking", "services", "demo-runs", "precision", "sed", "ovsam")
    if not argv or argv[0] not in commands:
        print(f"usage: ovseg-bench {{{'|'.join(commands)}}} [options]  (--help after the command for options)")
        return 2
    command, rest = argv[0], argv[1:]
    if command == "accuracy":
        from .accuracy import main as run
    elif command == "speed":
        from .speed import main as run
    elif command == "prompt":
        from .prompt_speed import main as run
    elif command == "tracking":
        from .tracking import main as run
    elif command == "services":
        from .services import main as run
    elif command == "demo-runs":
        from .demo_runs import main as run
    elif command == "precision":
        from .precision import main as run
    elif command == "sed":
        from .sed_speed import main as run
    elif command == "ovsam":
        from .ovsam_speed import main as run
    else:
        from .soak import main as run
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
