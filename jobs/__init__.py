"""Thin command-line entry points: parse, build, run."""
