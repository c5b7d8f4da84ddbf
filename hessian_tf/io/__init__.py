"""Models, datasets and results on disk."""
