"""Every job's options, their defaults, choices and types stay what tests/golden/job_options.json recorded
(help texts may change): a refactoring of how the command lines are built must not change them. After a
deliberate change to a command line: `python tests/job_options.py > tests/golden/job_options.json`."""

import json
from pathlib import Path

from job_options import all_options

GOLDEN = Path(__file__).parent / "golden" / "job_options.json"


def test_every_job_keeps_its_options():
    recorded, now = json.loads(GOLDEN.read_text()), all_options()
    assert sorted(now) == sorted(recorded)
    for job in recorded:
        gone = sorted(set(recorded[job]) - set(now[job]))
        added = sorted(set(now[job]) - set(recorded[job]))
        assert not gone and not added, f"{job}: options gone {gone}, added {added}"
        before, after = recorded[job], now[job]
        changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
        assert not changed, f"{job}: {changed}"
