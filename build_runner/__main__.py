"""Entry point of the build runner (console script `lucity-build-runner`)."""

from __future__ import annotations

import sys


def main() -> int:
    """Run one build as configured by the Job's environment."""
    print("lucity-build-runner: not implemented yet (see the runner issue)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
