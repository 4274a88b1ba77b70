"""Checkpoint conversion: Hugging Face export and import, resharding to another TP/PP layout."""
