"""The download stage: url lists, image folders, existing shards or demo data into `real/` shards."""
