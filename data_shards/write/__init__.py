"""Annotations + media -> webdataset shards: ingest, transcode, write, and the synthetic set."""
