"""Scripts that measure ditlab features end to end and write markdown reports."""
