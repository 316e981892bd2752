"""The version of gq-tokenizer, cited by every checkpoint and token file."""

__version__ = "0.1.0"
