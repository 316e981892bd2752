"""Nearest-code search for Gaussian Quant: one function, both rules, torch on the CPU or a CuPy kernel."""

from kernels.rules import RULES
from kernels.search import DEFAULT_SCRATCH_BYTES, nearest_code

__all__ = ["DEFAULT_SCRATCH_BYTES", "RULES", "nearest_code"]
