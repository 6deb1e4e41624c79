"""Benchmarks: scripts (not tests) that measure what KV caching and prefix caching save, side by side."""
