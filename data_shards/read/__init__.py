"""Shards -> batches: sources, tar streaming, resumable mixed streams, the reader, batching, read health."""
