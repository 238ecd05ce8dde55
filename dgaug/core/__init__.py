"""The bottom layer: atomic writes, hashing and seeds, shard formats, storage, constants; imports nothing of dgaug."""
