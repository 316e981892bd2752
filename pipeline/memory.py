"""Peak resident memory of this process, for commit records, training metrics and benchmarks."""

from __future__ import annotations

import resource


def peak_rss_mib() -> float:
    """This process's resident-set high-water mark (VmHWM), in MiB.

    Not `getrusage().ru_maxrss`: Linux carries that across fork and exec, so a Ray worker (or any child)
    reports its parent's peak when the parent was bigger. VmHWM belongs to the process's own address space.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)  # kB
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # fallback (KiB on Linux)
