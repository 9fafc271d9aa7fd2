"""The memory figure jobs report in their summary."""

import numpy as np

from jobs.summary import PeakMemory


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
        inside = np.ones(200 * 2**20 // 8)
        del inside
    assert quiet.mib < before + 100
    assert busy.mib >= quiet.mib + 190
