"""Images in: shard listing and opening, tar -> samples, decoding and the one preprocessing, as generator
stages (`stages.py`) that every reader of images composes."""
