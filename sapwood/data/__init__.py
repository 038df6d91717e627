"""Data: text shards, scientific datacubes (simulate, prepare, load, augment)."""
