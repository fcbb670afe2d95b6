"""Helpers the benchmark scripts share: usage errors and a check that the CPUs are idle."""

from __future__ import annotations

import os
import sys
import time
from typing import NoReturn


def fail(message: str) -> NoReturn:
    """Print ``message`` on stderr and exit with code 2 (bad input the user can fix)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def busy_note(sample_s: float = 0.5) -> tuple[float, str]:
    """CPUs that other processes keep busy (from /proc/stat; else the load average), and a note."""
    cpus = os.cpu_count() or 1

    def times() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        total0, idle0 = times()
        time.sleep(sample_s)
        total1, idle1 = times()
        busy = cpus * (1 - (idle1 - idle0) / max(1, total1 - total0))
        note = f"{busy:.1f} of {cpus} CPUs busy before the start"
    except (OSError, ValueError, IndexError):
        busy = os.getloadavg()[0]
        note = f"load average {busy:.1f} on {cpus} CPUs"
    if busy > 0.25:
        note += " (other processes are running: CPU timings will be low and noisy)"
    return busy, note
