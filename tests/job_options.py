"""Every job's command line as data: each option's strings, destination, default, choices, type and
whether it is required, read off the argparse parser the job builds (help texts left out: they may be
reworded). `python tests/job_options.py > tests/golden/job_options.json` records them;
tests/test_job_options.py checks that a refactoring keeps them."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

JOBS = (
    "tokenize",
    "make_shards",
    "train_vae",
    "evaluate",
    "detokenize",
    "convert",
    "audit",
    "demo",
    "theorem",
)


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def _capture(self: argparse.ArgumentParser, *args, **kwargs):
    raise _Captured(self)


def parser_of(job: str) -> argparse.ArgumentParser | None:
    """The parser `jobs/<job>.py` builds (None for a job that is not there)."""
    try:
        module = importlib.import_module(f"jobs.{job}")
    except ModuleNotFoundError:
        return None
    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = _capture
    try:
        module.parse_args([])
    except _Captured as e:
        return e.parser
    finally:
        argparse.ArgumentParser.parse_args = original
    raise RuntimeError(f"jobs/{job}.py: parse_args built no parser")


def _value(value: object) -> object:
    if isinstance(value, str):  # a default inside the checkout (demo's) is the same in every clone
        return value.replace(str(REPO), "<repo>")
    return value if isinstance(value, (int, float, bool, type(None))) else repr(value)


def options(parser: argparse.ArgumentParser) -> dict:
    """option -> its description; subcommands recursively under "<name> ..." keys."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found |= {f"{name} {k}": v for k, v in options(sub).items()}
            continue
        if isinstance(action, argparse._HelpAction):
            continue
        key = "/".join(action.option_strings) or action.dest
        found[key] = {
            "dest": action.dest,
            "default": _value(action.default),
            "choices": [_value(c) for c in action.choices] if action.choices is not None else None,
            "type": getattr(action.type, "__name__", None),
            "required": action.required,
            "nargs": _value(action.nargs),
            "flag": action.nargs == 0,
        }
    return found


def all_options() -> dict:
    return {job: options(p) for job in JOBS if (p := parser_of(job)) is not None}


if __name__ == "__main__":
    json.dump(all_options(), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
