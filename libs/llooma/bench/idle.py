"""What the idle stack burns, process by process: `llooma up`'s stack, demo hosts included.

    .venv/bin/python -m llooma.bench.idle [--seconds 60] [--runs 3] [--settle 15]

Starts the embedded stack (nats-server, Postgres, every service, the three demo hosts), lets
it settle, then reads each process's CPU time (user + system, from /proc, children included:
Postgres's backends count for Postgres) at the start and end of each window. CPU time, not
wall-clock effects, so other work on the machine changes the figures little; the load average
is printed beside them all the same.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from llooma.bench.peers import cpu_seconds, process_names
from llooma.processes import free_port
from llooma.stack import Stack


def measure(stack: Stack, seconds: float) -> dict[str, float]:
    """Percent of one core each process used over `seconds`."""
    pids = process_names(stack)
    before = {name: cpu_seconds([pid]) for name, pid in pids.items()}
    started = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - started
    return {
        name: 100.0 * (cpu_seconds([pid]) - before[name]) / elapsed for name, pid in pids.items()
    }


def table(runs: list[dict[str, float]]) -> str:
    names = sorted(runs[0], key=lambda n: -statistics.median(r[n] for r in runs))
    header = "| process | " + " | ".join(f"run {i + 1}" for i in range(len(runs)))
    lines = [header + " | median |", "|---|" + "---:|" * (len(runs) + 1)]
    for name in [*names, "total"]:
        values = [sum(r.values()) if name == "total" else r[name] for r in runs]
        cells = " | ".join(f"{v:.2f}" for v in values)
        lines.append(f"| {name} | {cells} | {statistics.median(values):.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of one window")
    parser.add_argument("--runs", type=int, default=3, help="windows, one after the other")
    parser.add_argument("--settle", type=float, default=15.0, help="wait after ready")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llooma-idle-") as scratch:
        stack = Stack(root=Path(scratch), http_port=free_port())
        stack.start()
        try:
            time.sleep(args.settle)
            load_before = os.getloadavg()
            runs = [measure(stack, args.seconds) for _ in range(args.runs)]
            load_after = os.getloadavg()
        finally:
            stack.stop()
    print(f"% of one core, {args.runs} windows of {args.seconds:.0f} s, {os.cpu_count()} cores;")
    print(f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after\n")
    print(table(runs))


if __name__ == "__main__":
    main()
