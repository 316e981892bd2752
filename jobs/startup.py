"""`ray_session`, the one way jobs start or join Ray.

(Each job's first lines put the checkout, not jobs/, at the head of sys.path when it runs as a script:
jobs/tokenize.py would otherwise shadow the standard library's `tokenize`, which inspect and linecache
import.)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


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
