"""The offline fixture world: shapes, captions and shards, labels, tiny text encoder, tiny VAE, scorer, the build."""
