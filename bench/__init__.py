"""Benchmarks: our client measured side by side with the reference tools (see README.md)."""
