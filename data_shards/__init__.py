"""Everything about samples, in two directions: write/ turns annotations and media into
webdataset shards, read/ streams shards into batches. At the top, what both share: the data
config (config.py, a leaf), the one error type for user mistakes (errors.py), the manifest,
media encoding and decoding, frame sampling, conversation templates, the tokenizer, and
`shards inspect` / `shards verify`.

Imports: only third-party libraries and data_shards itself (never trainer or launch); write/
never imports read/ (tests/test_layout.py)."""
