"""Thin command-line entry points: parse, build, run."""

import sys

from jobs import startup

# The jobs import their shared start-up as `import startup` (their folder heads sys.path when run as
# scripts); imported as a package, the same module serves under that name.
sys.modules.setdefault("startup", startup)
