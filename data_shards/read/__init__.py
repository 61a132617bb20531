"""Shards -> batches: fsspec sources and shard lists (sources), tar streaming (tarstream), the
resumable mixed streams (stream), the per-rank loader and its state (reader), collation and
packing (batching), and read-time skip counts (health).

Imports: the top of data_shards and torch's DataLoader; never write/, trainer or launch."""
