"""Batches for training: sources split by data-parallel rank. Knows nothing of the model."""
