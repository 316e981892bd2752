"""The start-up every job shares: imported first, as `import startup`, before anything else.

Run as `python jobs/<job>.py`, a job's folder heads sys.path, where jobs/tokenize.py would shadow the
standard library's `tokenize` (imported by inspect and linecache): importing this module puts the
checkout there instead. (Imported as `jobs.<job>`, `jobs/__init__.py` registers this module under the
same name.) `ray_session` is the one way jobs start or join Ray.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

_JOBS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(_JOBS)
sys.path[:] = [ROOT] + [p for p in sys.path if os.path.abspath(p or ".") not in (_JOBS, ROOT)]


@contextlib.contextmanager
def ray_session(**kwargs) -> Iterator[None]:
    """Join RAY_ADDRESS or a local `ray start` cluster, else start an embedded one; shut down after.

    The embedded cluster gets no dashboard (a dozen processes on a small machine); settings for an
    embedded cluster are ignored when joining one. Ray is imported here, late, so that argument errors
    answer without it."""
    import ray

    ray.init(address=os.environ.get("RAY_ADDRESS") or None, **({"include_dashboard": False} | kwargs))
    try:
        yield
    finally:
        ray.shutdown()
