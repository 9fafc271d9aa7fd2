"""The summary every job prints, and the memory figure jobs report in it."""

import numpy as np

from jobs.summary import JobSummary, PeakMemory


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def test_peak_memory_is_the_blocks_own_not_the_process_peak_before_it():
    before = rss_mib()
    earlier = np.ones(400 * 2**20 // 8)  # ru_maxrss would report this one (the process's peak so far)
    del earlier
    with PeakMemory() as quiet:
        pass
    with PeakMemory() as busy:
        # the RSS while the block holds its 200 MiB: its peak is that, whatever other threads of
        # the full suite free meanwhile (against the block's start, 42 MiB went); VmHWM lags VmRSS
        # by the kernel's per-thread counters (a few pages each)
        inside = np.ones(200 * 2**20 // 8)
        during = rss_mib()
        del inside
    assert quiet.mib < before + 100
    assert busy.mib >= during - 8 and rss_mib() < during - 150  # the peak, not the RSS at its end


def test_a_run_with_every_unit_done_before_prints_no_rate():
    skipped = JobSummary("ingest", rows_in=2264, seconds=0.4, units_skipped=3)
    assert "time: 0.4 s, nothing to run" in skipped.render() and "rows/s" not in skipped.render()
    ran = JobSummary("ingest", rows_in=100, seconds=2.0, units_done=1, units_skipped=3)
    assert "time: 2.0 s, 50.0 rows/s" in ran.render()


def test_the_rate_counts_the_rows_of_the_units_run_now():
    """rows_in counts every current unit, those done before too: 29 rows in 28.5 s said 1.0 rows/s
    where the run read the 5 samples of its one new unit."""
    partial = JobSummary("ingest", rows_in=29, rows_run=5, seconds=28.5, units_done=1, units_skipped=3)
    assert "rows in: 29 (5 in the units run now)" in partial.render()
    assert "time: 28.5 s, 0.2 rows/s" in partial.render()
