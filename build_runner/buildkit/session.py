"""The BuildKit client session: a gRPC server tunnelled through Control.Session.

Owns the tunnel only (BuildKit `session/session.go`, `session/grpchijack`):
`Control.Session` carries raw HTTP/2 bytes, the daemon being the HTTP/2 client,
and `tunnel.TunnelServer` serves the attachables (Health, Auth, FileSync,
Secrets) on those bytes in this process and on the caller's event loop: no
socket, no thread, no second gRPC stack. Health checks are therefore answered
on the caller's loop, which must not block (the attachables walk and read files
in worker threads). The attachables themselves live in `auth.py`, `sync.py` and
`secrets.py`. A broken tunnel, or a daemon that stops health-checking us, sets
`failed` and `error` instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets as token_source
import time
from collections.abc import AsyncIterator, Mapping

import grpc
from google.protobuf.descriptor import FileDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from build_runner._pb.buildkit import (
    auth_pb2,
    auth_pb2_grpc,
    control_pb2,
    control_pb2_grpc,
    filesync_pb2,
    filesync_pb2_grpc,
    secrets_pb2,
    secrets_pb2_grpc,
)
from build_runner.buildkit.auth import AuthServicer, Credentials
from build_runner.buildkit.errors import SessionError
from build_runner.buildkit.secrets import SecretsServicer
from build_runner.buildkit.sync import FileSyncServicer
from build_runner.buildkit.tunnel import MethodRegistry, TunnelProtocolError, TunnelServer

logger = logging.getLogger(__name__)

# Header names of the session handshake (session.go); gRPC Python rejects
# uppercase metadata keys, the daemon canonicalizes them anyway.
HEADER_SESSION_ID = "x-docker-expose-session-uuid"
HEADER_SESSION_NAME = "x-docker-expose-session-name"
HEADER_SHARED_KEY = "x-docker-expose-session-sharedkey"
HEADER_METHOD = "x-docker-expose-session-grpc-method"

# Outbound tunnel messages carry up to this much of the HTTP/2 byte stream: the
# cost of the Control.Session stream is per message, and 1 MiB stays far below
# the daemon's 16 MiB message limit. Bytes queued while one message is being
# sent go out together in the next.
TUNNEL_MESSAGE_BYTES = 1024 * 1024
# How long attach() waits for the daemon to answer the Session call. The
# daemon sends its HTTP/2 preface at once, so a few seconds means it is gone.
DEFAULT_CONNECT_TIMEOUT_S = 10.0
# The daemon health-checks every session every 5 s (session/grpc.go) and drops
# it after two failed checks, each allowed 15 s, WITHOUT ending the
# Control.Session stream. Silence this long therefore means the daemon has
# dropped us; reporting it beats a build failing later with "no active session".
DEFAULT_HEALTH_SILENCE_S = 40.0


class _WatchedHealth(health.aio.HealthServicer):  # type: ignore[misc,name-defined]
    """grpc_health's servicer, noting when the daemon last checked on us."""

    def __init__(self) -> None:
        super().__init__()
        self.last_check = time.monotonic()

    async def Check(
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> health_pb2.HealthCheckResponse:
        self.last_check = time.monotonic()
        response: health_pb2.HealthCheckResponse = await super().Check(request, context)
        return response


_SessionCall = grpc.aio.StreamStreamCall[control_pb2.BytesMessage, control_pb2.BytesMessage]

_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


def new_session_id() -> str:
    """A random 25-character id, the shape BuildKit's `identity.NewID` gives."""
    return "".join(token_source.choice(_ID_ALPHABET) for _ in range(25))


def _service_methods(descriptor: FileDescriptor, service: str) -> list[str]:
    svc = descriptor.services_by_name[service]
    return [f"/{svc.full_name}/{m.name}" for m in svc.methods]


class Session:
    """One client session; `attach()` opens it on a daemon for the duration of a block."""

    def __init__(
        self,
        *,
        credentials: Credentials | None = None,
        local_dirs: Mapping[str, str | os.PathLike[str]] | None = None,
        secrets: Mapping[str, bytes] | None = None,
        shared_key: str = "",
        name: str = "lucity-builder",
        session_id: str | None = None,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        health_silence_s: float | None = DEFAULT_HEALTH_SILENCE_S,
    ) -> None:
        self.id: str = session_id or new_session_id()
        self.shared_key = shared_key
        self.name = name
        self.connect_timeout_s = connect_timeout_s
        self.health_silence_s = health_silence_s
        """Fail the session when no health check came for this long; None: never."""
        self._health = _WatchedHealth()
        self._credentials = credentials if credentials is not None else Credentials()
        self._local_dirs = dict(local_dirs or {})
        self._secrets = dict(secrets or {})
        self.failed = asyncio.Event()
        """Set when the tunnel broke while attached; `error` then says why."""
        self.error: SessionError | None = None
        self._closing = False

    def __repr__(self) -> str:
        return (
            f"Session(id={self.id!r}, local_dirs={sorted(self._local_dirs)!r}, "
            f"secrets={sorted(self._secrets)!r}, credentials={self._credentials!r})"
        )

    @property
    def methods(self) -> list[str]:
        """Full paths of every method served, one header entry each."""
        methods = _service_methods(health_pb2.DESCRIPTOR, "Health")
        methods += _service_methods(auth_pb2.DESCRIPTOR, "Auth")
        if self._local_dirs:
            methods += _service_methods(filesync_pb2.DESCRIPTOR, "FileSync")
        if self._secrets:
            methods += _service_methods(secrets_pb2.DESCRIPTOR, "Secrets")
        return methods

    def headers(self) -> list[tuple[str, str]]:
        """The Control.Session request metadata announcing this session."""
        headers = [
            (HEADER_SESSION_ID, self.id),
            (HEADER_SESSION_NAME, self.name),
            (HEADER_SHARED_KEY, self.shared_key),
        ]
        headers += [(HEADER_METHOD, m) for m in self.methods]
        return headers

    def _server(self) -> TunnelServer:
        server = MethodRegistry()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        # The generated registration functions below are untyped.
        auth = AuthServicer(self._credentials)
        auth_pb2_grpc.add_AuthServicer_to_server(auth, server)  # type: ignore[no-untyped-call]
        if self._local_dirs:
            sync = FileSyncServicer(self._local_dirs)
            filesync_pb2_grpc.add_FileSyncServicer_to_server(sync, server)  # type: ignore[no-untyped-call]
        if self._secrets:
            secrets = SecretsServicer(self._secrets)
            secrets_pb2_grpc.add_SecretsServicer_to_server(secrets, server)  # type: ignore[no-untyped-call]
        return TunnelServer(server.methods, on_failure=self._on_server_failure)

    def _on_server_failure(self, message: str) -> None:
        if not self._closing:
            self._fail(message, None)

    def attach(
        self, control: control_pb2_grpc.ControlStub
    ) -> contextlib.AbstractAsyncContextManager[None]:
        """Serve this session to the daemon behind `control` while the block runs.

        Raises SessionError if the daemon does not take the session. While
        attached, a broken tunnel sets `failed` and `error`; the block is not
        interrupted, so callers race their work against `failed.wait()`.
        """
        return self._attached(control)

    @contextlib.asynccontextmanager
    async def _attached(self, control: control_pb2_grpc.ControlStub) -> AsyncIterator[None]:
        self.failed.clear()
        self.error = None
        self._closing = False
        server = self._server()
        tasks: list[asyncio.Task[None]] = []
        call: _SessionCall | None = None
        try:
            server.start()
            # Written by our own task, not from a request iterator: grpc.aio would
            # consume that in a task of its own that nobody awaits, and that keeps
            # waiting for output after the call failed.
            call = control.Session(metadata=self.headers())
            tasks.append(asyncio.create_task(self._outgoing(call, server), name="session-out"))
            await self._await_daemon(call)
            tasks.append(asyncio.create_task(self._incoming(call, server), name="session-in"))
            tasks.append(asyncio.create_task(self._watch(call), name="session-watch"))
            if self.health_silence_s is not None:
                tasks.append(
                    asyncio.create_task(
                        self._watch_health(self.health_silence_s), name="session-health"
                    )
                )
            logger.debug("session %s attached, serving %s", self.id, self.methods)
            yield
        finally:
            self._closing = True
            if call is not None:
                # Cancelling is how the Go client closes a session, too.
                call.cancel()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await server.aclose()

    async def _await_daemon(self, call: _SessionCall) -> None:
        """Wait for the daemon's response headers, so a dead daemon fails here, not later."""
        try:
            await asyncio.wait_for(call.initial_metadata(), self.connect_timeout_s)
        except TimeoutError as exc:
            call.cancel()
            raise SessionError(
                f"buildkitd did not answer the session call within {self.connect_timeout_s:g} s"
            ) from exc
        except grpc.aio.AioRpcError as exc:
            raise SessionError(
                f"buildkitd refused the session: {exc.code().name}: {exc.details()}",
                code=exc.code(),
            ) from exc
        if call.done():
            code = await call.code()
            details = await call.details()
            raise SessionError(
                f"buildkitd ended the session at once: {code.name}: {details}", code=code
            )

    async def _outgoing(self, call: _SessionCall, server: TunnelServer) -> None:
        """The server's HTTP/2 output, as tunnel messages (half-closes when it ends)."""
        try:
            while (data := await server.next_output(TUNNEL_MESSAGE_BYTES)) is not None:
                await call.write(control_pb2.BytesMessage(data=data))
            await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            # The call has ended; _incoming and _watch report why.
            return

    async def _incoming(self, call: _SessionCall, server: TunnelServer) -> None:
        """Tunnel messages from the daemon, fed to the server."""
        try:
            async for message in call:
                server.receive_data(message.data)
        except grpc.aio.AioRpcError as exc:
            if not self._closing:
                self._fail(
                    f"session tunnel to buildkitd broke: {exc.code().name}: {exc.details()}",
                    exc.code(),
                )
            return
        except TunnelProtocolError as exc:
            self._fail(str(exc), None)
            call.cancel()
            return
        if not self._closing:
            self._fail("buildkitd closed the session", None)

    async def _watch(self, call: _SessionCall) -> None:
        """Report the call's end even when no more messages flow."""
        code = await call.code()
        if not self._closing and not self.failed.is_set():
            details = await call.details()
            self._fail(f"session tunnel to buildkitd broke: {code.name}: {details}", code)

    async def _watch_health(self, silence_s: float) -> None:
        """Report a daemon that stopped health-checking us: it has dropped the session."""
        # Counted from attach: the first check comes about 5 s after connecting.
        self._health.last_check = time.monotonic()
        while not self.failed.is_set():
            quiet_s = time.monotonic() - self._health.last_check
            if quiet_s > silence_s:
                self._fail(
                    f"buildkitd stopped health-checking the session ({quiet_s:.0f} s without a "
                    "check); it drops sessions whose checks fail",
                    None,
                )
                return
            await asyncio.sleep(min(1.0, silence_s / 4))

    def _fail(self, message: str, code: grpc.StatusCode | None) -> None:
        if self.failed.is_set():
            return
        logger.warning("session %s failed: %s", self.id, message)
        self.error = SessionError(message, code=code)
        self.failed.set()
