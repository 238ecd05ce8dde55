"""The features stage: CLIP embeddings of real and ED-SAM samples, to Parquet."""
