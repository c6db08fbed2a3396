"""Errors raised by the BuildKit client.

    BuildkitError
    ├── BuildkitUnavailableError   can't connect, daemon died, or it never became ready
    ├── SolveError                 the daemon ran the build and it failed (a step, a push...)
    │   └── SolveCancelledError    the caller cancelled the solve
    └── SessionError               the client session (tunnel, auth, file sync) broke

Each error keeps the gRPC status code it came from (when there was one) and is
raised `from` the library error on the line that called the library.
"""

from __future__ import annotations

import grpc


class BuildkitError(Exception):
    """Base of every error this client raises."""

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class BuildkitUnavailableError(BuildkitError):
    """The daemon can't be reached, died mid-call, or was not ready in time."""


class SolveError(BuildkitError):
    """The daemon reported a failed build (step failure, push rejected, bad LLB...)."""


class SolveCancelledError(SolveError):
    """The solve was cancelled by the caller; the daemon was told to stop."""


class SessionError(BuildkitError):
    """The client session broke: tunnel closed, health checks failed, or a handler crashed."""
