"""Pytest fixtures for buildkitd and the authenticating registry (filled by the foundation work)."""
