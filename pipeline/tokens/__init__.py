"""Token files out and back: the Parquet schema and writer, run and commit records, the downstream reader,
the flat export and the detokenizer."""
