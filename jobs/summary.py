"""The summary every job prints at its end: rows in and out, errors by kind, throughput."""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class JobSummary:
    job: str
    rows_in: int = 0
    rows_out: dict[str, int] = field(default_factory=dict)
    errors_by_kind: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    units_done: int = 0
    units_skipped: int = 0
    dropped: int = 0  # inputs that produced no output row because of an error
    # the largest share of its inputs one step failed on without dropping them (annotate: a model
    # that failed on every image leaves them without its rows, which is no success either)
    failed_share: float = 0.0
    # rows of the units this run worked on, where rows_in also counts the units done before: the
    # throughput's numerator (29 rows in 28.5 s said 1.0 rows/s where the run read 5); None: rows_in
    rows_run: int | None = None

    @property
    def errors(self) -> int:
        return sum(self.errors_by_kind.values())

    @property
    def error_rate(self) -> float:
        return max(self.dropped / self.rows_in if self.rows_in else 0.0, self.failed_share)

    def render(self) -> str:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.errors_by_kind.items()))
        run = self.rows_in if self.rows_run is None else self.rows_run
        rate = run / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"== {self.job} summary",
            f"units: {self.units_done} run, {self.units_skipped} already done (skipped)",
            f"rows in: {self.rows_in}" + (f" ({run} in the units run now)" if run != self.rows_in and self.units_done
                                          else ""),
            "rows out: " + ", ".join(f"{k} {v}" for k, v in self.rows_out.items()),
            f"errors: {self.errors}" + (f" ({kinds})" if self.errors else ""),
            f"time: {self.seconds:.1f} s, " + (f"{rate:.1f} rows/s" if self.units_done or not self.units_skipped
                                                else "nothing to run (a rate would count rows done before)"),
        ]
        return "\n".join(lines + self.notes)

    def print(self) -> None:
        print(self.render(), file=sys.stdout, flush=True)


class PeakMemory:
    """The peak RSS of this process while in the block, in MiB (`mib`; 0 where /proc is not Linux's).

    Not getrusage's ru_maxrss: that is the process's peak since it started, which in a reused Ray
    worker includes every task it ran before, and in a fresh one its parent's RSS at the fork.
    Writing 5 to /proc/self/clear_refs resets the peak (VmHWM) to the RSS now."""

    def __enter__(self) -> PeakMemory:
        self.mib = 0.0
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        return self

    def __exit__(self, *exc) -> None:
        try:
            with open("/proc/self/status") as f:
                self.mib = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
        except (OSError, StopIteration):
            self.mib = 0.0
