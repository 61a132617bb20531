"""Annotations + media -> webdataset shards: reading annotation files (annotations), checking and
transcoding each sample (ingest, transcode), the parallel, resumable build (shards), tar writing
(writer) and the synthetic moving-shapes dataset (synth).

Imports: the top of data_shards, never read/ (tests/test_layout.py)."""
