"""A Python BuildKit client: Control (solve, status), the session and its attachables."""
