"""The data layer: Parquet schemas, dataset writing and checked reading, padded JAX batches."""
