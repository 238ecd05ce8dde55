"""The lightweight trainer: trains and evaluates on dgaug's shard formats; imports nothing from dgaug.pipeline."""
