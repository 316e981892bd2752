"""Moved to `pipeline.tokens.export`; kept for downstream code written before the pipeline/ layout."""

import warnings

from pipeline.tokens.export import export_flat, open_flat  # noqa: F401

warnings.warn("pipeline.export moved to pipeline.tokens.export", DeprecationWarning, stacklevel=2)
