"""Find and kill every process a test's job started, by a marker in their environment.

Ray starts its actors in sessions of their own, so killing the driver's process group leaves them
running for a moment; the marker, inherited by every process of the job, finds them all.
"""

import contextlib
import os
import signal
import time
from pathlib import Path


def processes_with(marker: str) -> list[int]:
    """Processes of this machine whose environment carries the marker (the job, Ray's daemons, workers)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if marker.encode() in (entry / "environ").read_bytes():
                    pids.append(int(entry.name))
    return pids


def kill_marked(marker: str, timeout: float = 30.0) -> None:
    """SIGKILL every process carrying the marker until none is left."""
    deadline = time.monotonic() + timeout
    while pids := processes_with(marker):
        assert time.monotonic() < deadline, f"processes of the killed job still alive: {pids}"
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
