"""Moved to `pipeline.tokens.reader`; kept for downstream code written before the pipeline/ layout."""

import warnings

from pipeline.tokens.reader import TokenDataset, TokenFileMismatch, list_token_files  # noqa: F401

warnings.warn("pipeline.reader moved to pipeline.tokens.reader", DeprecationWarning, stacklevel=2)
