"""Pack an image folder into WebDataset tar shards that jobs/tokenize.py reads (labels as `.cls`).

    python jobs/make_shards.py --input imagenet/train --output shards/train --samples-per-shard 1000
    python jobs/make_shards.py --input imagenet/val --labels val_labels.txt --output shards/val
    python jobs/make_shards.py --input imagenet/val2 --classes shards/train/classes.json --output shards/val2
    python jobs/make_shards.py --input list.txt --output s3://bucket/shards --shuffle-seed 0

Layouts (--layout auto|classes|flat): class folders (label = index of the sorted names of all class
folders, written to DIR/classes.json; --classes reuses a previous run's), a flat folder (with --labels
FILE of `name label` lines, ImageNet val style), or a list file of `path[,label]` lines. Image bytes are
copied as they are. Shards are written atomically; a rerun completes what is missing and leaves finished
shards alone. Every file ends as a sample or a skip with its reason in DIR's records. Exit status: 0 done,
1 an I/O error (a folder or file that cannot be read, a failed write: the shards finished so far stay;
run again to complete), 2 bad arguments or input.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # as a script, jobs/ heads sys.path and its tokenize.py shadows the stdlib's:
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout instead

import argparse

from pipeline.cli import add_config_arguments, config_from_args
from pipeline.pack.folder_shards import ShardingSettings, make_shards


def parse_args(argv: list[str] | None = None) -> ShardingSettings:
    """Every field of ShardingSettings as an option, its help the field's documentation."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, ShardingSettings)
    args = p.parse_args(argv)
    try:
        return config_from_args(ShardingSettings, args)
    except ValueError as e:
        p.error(str(e))


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    try:
        summary = make_shards(settings)
    except ValueError as e:  # bad arguments, another plan in DIR: one line, exit 2
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an unreadable folder, a failed write: the shards finished so far stay
        print(f"make_shards: failed: {type(e).__name__}: {e} (run again to complete)", file=sys.stderr)
        return 1
    print(summary.format(), flush=True)
    if summary.failed:
        first = summary.failed[0]
        print(
            f"make_shards: failed: {len(summary.failed)} shard(s), e.g. {first} (run again to complete)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
