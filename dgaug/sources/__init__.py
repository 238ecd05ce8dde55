"""Where samples come from: url lists, image folders, existing shards, the synthetic toy world."""
