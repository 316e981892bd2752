"""The tokenize job: the shard processor (no Ray), the Ray actor that wraps it, and the driver."""
