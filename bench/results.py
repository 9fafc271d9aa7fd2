"""What every benchmark shares: sides timed in alternation (median of the rounds), and the
RESULT line each figure ends with."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def result(name: str, ratio: float, goal: float) -> str:
    """The figure's line. Four decimals where two would round onto the goal (1.098 against 1.1
    read "ratio=1.10 goal=1.1 met=no")."""
    shown = f"{ratio:.2f}" if f"{ratio:.2f}" != f"{goal:.2f}" else f"{ratio:.4f}"
    return f"RESULT {name} ratio={shown} goal={goal} met={'yes' if ratio >= goal else 'no'}"


def alternated(sides: dict[str, Callable[[], object]], rounds: int,
               clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds of each side, the sides run one after the other `rounds` times, so that
    a slow spell of a shared machine falls on all of them alike; `clock`: wall time, or e.g.
    time.process_time for this process's CPU."""
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, side in sides.items():
            started = clock()
            side()
            seconds[name].append(clock() - started)
    return {name: statistics.median(values) for name, values in seconds.items()}


def memory_mib(field: str = "VmHWM") -> float:
    """This process's peak RSS (VmHWM) or RSS now (VmRSS), in MiB. Not getrusage's ru_maxrss: on
    Linux a child process starts with its parent's RSS at the fork as its peak."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024
