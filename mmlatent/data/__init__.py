"""Data: the shard sample format, shard writing, the synthetic dataset, and the streaming pipeline to batches."""
