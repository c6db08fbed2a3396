"""Shared pytest configuration: the real-daemon test bed fixtures live in tests/testbed/."""

from __future__ import annotations

pytest_plugins = [
    "tests.testbed.buildkit_fixtures",
    "tests.testbed.kube_fixtures",
]
