"""Ray orchestration and data I/O for tokenizing WebDataset shards into Parquet (issue 3 builds it)."""
