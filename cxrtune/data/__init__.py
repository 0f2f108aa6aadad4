"""Data sources, the Parquet index, the uint8 image cache and the few-shot task sampler."""
