"""Data I/O and Ray orchestration, one folder per part of the work: data/ (images in), tokens/ (token
files out and back), tokenize/ (the tokenize job), train/ (the training job), evaluate/ (reports)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the checkout holding gq/, kernels/ and pipeline/
