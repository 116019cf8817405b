"""Data: tokenizers, datasets, training objectives and the embedded synthetic tasks."""
