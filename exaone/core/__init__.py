"""Manifest, model definitions, checkpoint I/O and the reference runtime."""
