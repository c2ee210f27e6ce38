"""Benchmark harness: timing, metrics and dashboard rendering."""
