"""Evaluating a checkpoint on shards: the report (metrics, skipped samples) and its plots."""
