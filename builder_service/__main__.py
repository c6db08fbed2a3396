"""Entry point of the builder service (console script `lucity-builder-service`)."""

from __future__ import annotations

import sys


def main() -> int:
    """Start the builder service."""
    print("lucity-builder-service: not implemented yet (see the service issue)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
