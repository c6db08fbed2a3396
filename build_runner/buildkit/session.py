"""The BuildKit client session: a private gRPC server tunnelled through Control.Session.

Owns the tunnel only (BuildKit `session/session.go`, `session/grpchijack`): a
grpc.aio server, on its own event loop in a thread, listens on a Unix socket in
a private 0700 directory and serves the attachables (Health, Auth, FileSync,
Secrets); `Control.Session` carries the raw HTTP/2 bytes between that socket and
the daemon, which is the HTTP/2 client on this connection. The attachables
themselves live in `auth.py`, `sync.py` and `secrets.py`. A broken tunnel, or a
daemon that stops health-checking us, sets `failed` and `error` instead of hanging.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import secrets as token_source
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping

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

logger = logging.getLogger(__name__)

# Header names of the session handshake (session.go); gRPC Python rejects
# uppercase metadata keys, the daemon canonicalizes them anyway.
HEADER_SESSION_ID = "x-docker-expose-session-uuid"
HEADER_SESSION_NAME = "x-docker-expose-session-name"
HEADER_SHARED_KEY = "x-docker-expose-session-sharedkey"
HEADER_METHOD = "x-docker-expose-session-grpc-method"

# Tunnel reads of this size keep the message count low for bulk uploads while
# staying far below the daemon's message size limit.
TUNNEL_READ_SIZE = 256 * 1024
# How long attach() waits for the daemon to answer the Session call. The
# daemon sends its HTTP/2 preface at once, so a few seconds means it is gone.
DEFAULT_CONNECT_TIMEOUT_S = 10.0
# How long closing waits for the server's in-flight handlers.
SERVER_STOP_GRACE_S = 1.0
# The daemon health-checks every session every 5 s (session/grpc.go) and drops
# it after two failed checks, each allowed 15 s, WITHOUT ending the
# Control.Session stream. Silence this long therefore means the daemon has
# dropped us; reporting it beats a build failing later with "no active session".
DEFAULT_HEALTH_SILENCE_S = 40.0
# Message limits as the Go client sets them (16 MiB both ways).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

SOCKET_NAME = "session.sock"
# sockaddr_un holds 108 bytes including the NUL; a longer path cannot be bound.
MAX_SOCKET_PATH = 107


class _WatchedHealth(health.aio.HealthServicer):  # type: ignore[misc,name-defined]
    """grpc_health's servicer, noting when the daemon last checked on us."""

    def __init__(self) -> None:
        super().__init__()
        # Written by the server thread, read by the caller's loop: a float
        # assignment is atomic under the GIL.
        self.last_check = time.monotonic()

    async def Check(
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> health_pb2.HealthCheckResponse:
        self.last_check = time.monotonic()
        response: health_pb2.HealthCheckResponse = await super().Check(request, context)
        return response


class _ServerThread:
    """The session's grpc.aio server, on its own event loop in its own thread.

    The daemon's traffic then never waits behind the caller's loop (solve,
    progress rendering), the DiffCopy pump and the tunnel pump overlap, and
    health checks keep being answered while the caller's loop is busy.
    """

    def __init__(self, build: Callable[[], grpc.aio.Server], *, name: str) -> None:
        self._build = build
        self._name = name
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        # Set by the thread once `_loop` and `_stop` exist, so stop() can never
        # miss the thread, even if start() was cancelled half-way.
        self._ready = threading.Event()

    async def start(self, address: str) -> None:
        """Start serving on `address`; raises SessionError if the server can't start."""
        started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=asyncio.run, args=(self._serve(address, started),), name=self._name, daemon=True
        )
        self._thread.start()
        try:
            await asyncio.wrap_future(started)
        except RuntimeError as exc:  # grpc's "Failed to bind to address ..."
            raise SessionError(f"cannot serve the session on {address}: {exc}") from exc

    async def _serve(self, address: str, started: concurrent.futures.Future[None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._ready.set()
        # False if start() was cancelled first; once running it can't be cancelled.
        if not started.set_running_or_notify_cancel():
            return
        try:
            server = self._build()
            server.add_insecure_port(address)
            await server.start()
        except Exception as exc:
            started.set_exception(exc)
            return
        started.set_result(None)
        try:
            await self._stop.wait()
        finally:
            await server.stop(SERVER_STOP_GRACE_S)

    async def stop(self) -> None:
        """Stop the server (in-flight calls get a short grace) and join the thread."""
        if self._thread is None:
            return
        thread = self._thread
        await asyncio.to_thread(self._wait_ready, thread)
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # its loop already ended
                self._loop.call_soon_threadsafe(self._stop.set)
        await asyncio.to_thread(thread.join)

    def _wait_ready(self, thread: threading.Thread) -> None:
        while not self._ready.wait(0.1) and thread.is_alive():
            pass


def _private_dir() -> str:
    """A fresh 0700 directory for the session socket, short enough to bind in.

    The socket serves the build context, credentials and secrets, so only our
    user may reach it. mkdtemp creates the directory 0700 atomically.
    """
    for parent in (None, "/tmp"):
        path = tempfile.mkdtemp(prefix="lucity-s-", dir=parent)
        if len(os.path.join(path, SOCKET_NAME)) <= MAX_SOCKET_PATH:
            os.chmod(path, 0o700)
            return path
        os.rmdir(path)
    raise SessionError("no temporary directory short enough for a Unix socket")


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
        self.socket_path: str | None = None
        """The private socket while attached (for diagnostics and tests)."""
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

    def _server(self) -> grpc.aio.Server:
        server = grpc.aio.server(
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ]
        )
        # The generated registration functions are untyped.
        self._health = _WatchedHealth()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        auth = AuthServicer(self._credentials)
        auth_pb2_grpc.add_AuthServicer_to_server(auth, server)  # type: ignore[no-untyped-call]
        if self._local_dirs:
            sync = FileSyncServicer(self._local_dirs)
            filesync_pb2_grpc.add_FileSyncServicer_to_server(sync, server)  # type: ignore[no-untyped-call]
        if self._secrets:
            secrets = SecretsServicer(self._secrets)
            secrets_pb2_grpc.add_SecretsServicer_to_server(secrets, server)  # type: ignore[no-untyped-call]
        return server

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
        private_dir = _private_dir()
        server = _ServerThread(self._server, name=f"session-server-{self.id[:8]}")
        tasks: list[asyncio.Task[None]] = []
        call: _SessionCall | None = None
        writer: asyncio.StreamWriter | None = None
        try:
            socket_path = self.socket_path = os.path.join(private_dir, SOCKET_NAME)
            await server.start(f"unix:{socket_path}")
            reader, writer = await asyncio.open_unix_connection(socket_path)
            call = control.Session(self._outgoing(reader), metadata=self.headers())
            await self._await_daemon(call)
            tasks.append(asyncio.create_task(self._incoming(call, writer), name="session-in"))
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
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            await server.stop()
            shutil.rmtree(private_dir, ignore_errors=True)
            self.socket_path = None

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

    async def _outgoing(
        self, reader: asyncio.StreamReader
    ) -> AsyncIterator[control_pb2.BytesMessage]:
        """Bytes our server writes to the private socket, as tunnel messages."""
        while True:
            try:
                data = await reader.read(TUNNEL_READ_SIZE)
            except OSError as exc:
                self._fail(f"session socket read failed: {exc}", None)
                return
            if not data:
                # Our server closed the connection: ends the stream (half-close).
                if not self._closing:
                    self._fail("the local session server closed the tunnel", None)
                return
            yield control_pb2.BytesMessage(data=data)

    async def _incoming(
        self,
        call: _SessionCall,
        writer: asyncio.StreamWriter,
    ) -> None:
        """Tunnel messages from the daemon, written to the private socket."""
        try:
            async for message in call:
                writer.write(message.data)
                await writer.drain()
        except grpc.aio.AioRpcError as exc:
            if not self._closing:
                self._fail(
                    f"session tunnel to buildkitd broke: {exc.code().name}: {exc.details()}",
                    exc.code(),
                )
            return
        except OSError as exc:
            self._fail(f"session socket write failed: {exc}", None)
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
