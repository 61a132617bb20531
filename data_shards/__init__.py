"""Everything about samples: build shards, read them, decode media, tokenize, collate."""
