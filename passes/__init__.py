"""FX passes, one rewrite or analysis per file; the order they run in is in ``pipeline.py``."""
