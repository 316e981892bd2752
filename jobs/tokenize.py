"""Tokenize WebDataset image shards into Parquet token files with a GQ-VAE, on a Ray actor pool.

Run on a cluster:   ray job submit --working-dir . -- python jobs/tokenize.py --input SHARDS --output DIR \\
                        --checkpoint CKPT
Run locally:        python jobs/tokenize.py --input 'shards/train-{000000..000009}.tar' --output tokens/ \\
                        --checkpoint model.safetensors
Without a cluster to join it starts an embedded local Ray. Started again after any interruption it skips
the committed shards. Exit status: 0 every shard committed, 1 a shard could not be committed (unreadable,
or failing after retries; named in the summary) or the run stopped with no actor left and none placed
within --actor-wait (the summary says what was asked for and what the cluster has), 2 bad arguments.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # as a script, jobs/ heads sys.path and its tokenize.py shadows the stdlib's:
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout instead

import argparse

from jobs import startup
from pipeline.cli import add_config_arguments, config_from_args
from pipeline.tokenize.driver import run_job
from pipeline.tokenize.plan import plan, prepare_output
from pipeline.tokenize.settings import JobSettings, settle


def parse_args(argv: list[str] | None = None) -> JobSettings:
    """Every field of JobSettings and of its components as an option, its help the field's documentation."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, JobSettings)
    try:
        return config_from_args(JobSettings, p.parse_args(argv))
    except ValueError as e:
        p.error(str(e))


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    try:  # decided here, on the driver, so that the run record pins concrete values (never "auto")
        settings, warning, model = settle(settings)
        if warning:
            print(f"tokenize: warning: {warning}", file=sys.stderr, flush=True)
        shards, run = plan(settings, model)
        prepare_output(settings, run)
    except (ValueError, OSError) as e:  # bad arguments, unreadable paths: one line, exit 2
        print(f"tokenize: error: {e}", file=sys.stderr)
        return 2
    model = run["model_sha256"][:12]
    print(f"tokenize: {len(shards)} shards -> {settings.output} (model {model})", flush=True)

    with startup.ray_session():
        summary = run_job(settings, shards, run)
    print(summary.format(), flush=True)
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main())
