"""The BuildKit Control client: connect, wait for readiness, info, workers, prune, solve.

Owns the grpc.aio channel to buildkitd (unix socket or TCP, optional mutual TLS)
and the `moby.buildkit.v1.Control` calls (moby/buildkit `client/client.go`,
`client/solve.go`, `client/prune.go`, `client/workers.go`). A solve runs
Control.Solve and Control.Status side by side and may attach a client session.
Every grpc error passes through `_translated`, the one place that maps status
codes to the tree in errors.py. Does not build LLB (llb/) or serve the session
(session.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import string
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import grpc
import grpc.aio
import tenacity

from build_runner._pb.buildkit import control_pb2, control_pb2_grpc, ops_pb2
from build_runner.buildkit.errors import (
    BuildkitError,
    BuildkitUnavailableError,
    SessionError,
    SolveCancelledError,
    SolveError,
)
from build_runner.buildkit.exports import ExportSpec, RegistryCache, SolveResult
from build_runner.llb.ops import Platform

logger = logging.getLogger(__name__)

# The Go client raises both gRPC message limits to 16 MiB (client/client.go);
# definitions with inline mkfile data and large status batches need it.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# grpc-go servers (buildkitd) answer pings more often than every 5 minutes with
# GOAWAY "too_many_pings", so keepalive may not be tighter than that. It only
# matters for a TCP peer that vanishes silently; a dead local daemon closes the
# socket and fails calls at once.
KEEPALIVE_TIME_MS = 300_000
KEEPALIVE_TIMEOUT_MS = 20_000

ProgressCallback = Callable[[control_pb2.StatusResponse], None]
_StatusCall = grpc.aio.UnaryStreamCall[control_pb2.StatusRequest, control_pb2.StatusResponse]


@dataclass(frozen=True)
class TLSOptions:
    """Server verification and, with cert + key, client authentication (mutual TLS)."""

    ca_path: Path | None = None
    cert_path: Path | None = None
    key_path: Path | None = None
    # Name to verify in the server certificate when it differs from the address host.
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert_path is None) != (self.key_path is None):
            raise ValueError("mutual TLS needs both cert_path and key_path")
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_path.read_bytes() if self.ca_path else None,
            private_key=self.key_path.read_bytes() if self.key_path else None,
            certificate_chain=self.cert_path.read_bytes() if self.cert_path else None,
        )


@dataclass(frozen=True)
class ConnectOptions:
    """Where buildkitd listens and how long to wait for it."""

    # `unix:///run/buildkit/buildkitd.sock` or `tcp://host:port`.
    address: str
    tls: TLSOptions | None = None
    # Bound on waiting for the daemon to answer Info at connect; a pod's buildkitd
    # sidecar usually answers within a second or two of starting.
    ready_timeout_s: float = 30.0
    # Deadline of the short unary calls (info, workers, prune).
    rpc_timeout_s: float = 30.0
    # How long to keep reading Status after Solve returned: the stream normally
    # ends right away; the Go client gives up after 5 s of silence.
    status_drain_s: float = 5.0
    max_message_bytes: int = MAX_MESSAGE_BYTES

    def grpc_target(self) -> str:
        """The target string grpc understands for `address`."""
        if self.address.startswith("unix://"):
            return self.address
        if self.address.startswith("unix:"):
            return "unix://" + self.address.removeprefix("unix:")
        if self.address.startswith("tcp://"):
            return self.address.removeprefix("tcp://").rstrip("/")
        raise ValueError(f"unsupported buildkitd address {self.address!r}: use unix:// or tcp://")

    def channel_options(self) -> list[tuple[str, int | str]]:
        options: list[tuple[str, int | str]] = [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ]
        if self.tls is not None and self.tls.server_name:
            options.append(("grpc.ssl_target_name_override", self.tls.server_name))
        return options


@dataclass(frozen=True)
class BuildkitVersion:
    """`Control.Info`: what the daemon says it is."""

    package: str
    version: str
    revision: str


@dataclass(frozen=True)
class Worker:
    """One worker of the daemon and the platforms it builds for (first = default)."""

    id: str
    platforms: tuple[Platform, ...]
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PruneResult:
    """What `prune()` removed."""

    records: int
    bytes_freed: int


class SessionLike(Protocol):
    """What solve needs from a client session (implemented by session.Session).

    `attach` opens the tunnel over Control.Session for the life of the block; if
    the tunnel breaks meanwhile, `failed` is set and `error` says why.
    """

    id: str
    shared_key: str
    failed: asyncio.Event
    error: SessionError | None

    def attach(
        self, control: control_pb2_grpc.ControlStub
    ) -> contextlib.AbstractAsyncContextManager[None]: ...


_REF_ALPHABET = string.ascii_lowercase + string.digits


def new_ref() -> str:
    """A build ref like the Go client's identity.NewID(): 25 random base36 chars."""
    return "".join(secrets.choice(_REF_ALPHABET) for _ in range(25))


def _error_from_rpc(exc: grpc.aio.AioRpcError, *, what: str, solving: bool) -> BuildkitError:
    code = exc.code()
    details = exc.details() or code.name
    if code == grpc.StatusCode.UNAVAILABLE:
        return BuildkitUnavailableError(f"{what}: buildkitd unavailable: {details}", code=code)
    if solving:
        if code == grpc.StatusCode.CANCELLED:
            return SolveCancelledError(f"{what}: cancelled: {details}", code=code)
        return SolveError(f"{what} failed: {details}", code=code)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return BuildkitUnavailableError(f"{what}: buildkitd did not answer: {details}", code=code)
    return BuildkitError(f"{what} failed: {details}", code=code)


@contextlib.contextmanager
def _translated(what: str, *, solving: bool = False) -> Iterator[None]:
    """The single chokepoint turning grpc errors into errors.py (httpcore's map_exceptions)."""
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        raise _error_from_rpc(exc, what=what, solving=solving) from exc


class BuildkitClient:
    """An open connection to buildkitd. Use `async with BuildkitClient(options) as c:`."""

    def __init__(self, options: ConnectOptions) -> None:
        self.options = options
        self._channel: grpc.aio.Channel | None = None
        self._stub: control_pb2_grpc.ControlStub | None = None
        self._attached: set[str] = set()

    async def __aenter__(self) -> BuildkitClient:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def open(self, *, wait_ready: bool = True) -> None:
        """Create the channel and (by default) wait until the daemon answers Info."""
        target = self.options.grpc_target()
        channel_options = self.options.channel_options()
        if self.options.tls is not None:
            self._channel = grpc.aio.secure_channel(
                target, self.options.tls.credentials(), options=channel_options
            )
        else:
            self._channel = grpc.aio.insecure_channel(target, options=channel_options)
        # Generated grpc stubs carry no annotations.
        self._stub = control_pb2_grpc.ControlStub(self._channel)  # type: ignore[no-untyped-call]
        if wait_ready:
            try:
                await self.wait_ready()
            except BaseException:
                await self.close()
                raise

    async def close(self) -> None:
        """Close the channel; calls still running end with an error."""
        if self._channel is not None:
            await self._channel.close(grace=None)
        self._channel = None
        self._stub = None

    @property
    def control(self) -> control_pb2_grpc.ControlStub:
        """The raw Control stub (for the session tunnel)."""
        if self._stub is None:
            raise BuildkitError("client is not open")
        return self._stub

    async def wait_ready(self) -> BuildkitVersion:
        """Retry Info until it answers, for at most `ready_timeout_s`."""
        timeout = self.options.ready_timeout_s
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_delay(timeout),
            wait=tenacity.wait_exponential(multiplier=0.05, max=1.0),
            retry=tenacity.retry_if_exception_type(BuildkitUnavailableError),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self.info(timeout_s=min(5.0, max(timeout, 0.1)))
        except BuildkitUnavailableError as exc:
            raise BuildkitUnavailableError(
                f"buildkitd at {self.options.address} not ready after {timeout:g}s: {exc.message}",
                code=exc.code,
            ) from exc
        raise AssertionError("unreachable: tenacity either returns or raises")

    async def info(self, *, timeout_s: float | None = None) -> BuildkitVersion:
        """The daemon's version (`Control.Info`)."""
        with _translated("Info"):
            resp = await self.control.Info(
                control_pb2.InfoRequest(), timeout=timeout_s or self.options.rpc_timeout_s
            )
        v = resp.buildkitVersion
        return BuildkitVersion(package=v.package, version=v.version, revision=v.revision)

    async def list_workers(self) -> list[Worker]:
        """The daemon's workers (`Control.ListWorkers`)."""
        with _translated("ListWorkers"):
            resp = await self.control.ListWorkers(
                control_pb2.ListWorkersRequest(), timeout=self.options.rpc_timeout_s
            )
        return [
            Worker(
                id=r.ID,
                platforms=tuple(
                    Platform(
                        os=p.OS,
                        architecture=p.Architecture,
                        variant=p.Variant,
                        os_version=p.OSVersion,
                    )
                    for p in r.platforms
                ),
                labels=dict(r.Labels),
            )
            for r in resp.record
        ]

    async def default_platform(self) -> Platform:
        """The first platform of the first worker, which is what the daemon defaults to."""
        workers = await self.list_workers()
        if not workers or not workers[0].platforms:
            raise BuildkitError("buildkitd reports no worker platforms")
        return workers[0].platforms[0]

    async def prune(
        self, *, all: bool = True, keep_duration_s: float = 0, filters: Sequence[str] = ()
    ) -> PruneResult:
        """Delete build cache (`Control.Prune`); `all` also removes shared/internal records."""
        request = control_pb2.PruneRequest(
            all=all, keepDuration=int(keep_duration_s * 1e9), filter=list(filters)
        )
        records = 0
        freed = 0
        with _translated("Prune"):
            # No deadline: a large cache takes a while; the stream shows progress.
            async for record in self.control.Prune(request):
                records += 1
                freed += record.Size
        return PruneResult(records=records, bytes_freed=freed)

    @contextlib.asynccontextmanager
    async def attach(self, session: SessionLike) -> AsyncIterator[None]:
        """Keep `session` attached across several solves on this connection."""
        if session.id in self._attached:
            raise SessionError(f"session {session.id} is already attached")
        async with session.attach(self.control):
            self._attached.add(session.id)
            try:
                yield
            finally:
                self._attached.discard(session.id)

    async def solve(
        self,
        definition: ops_pb2.Definition,
        *,
        session: SessionLike | None = None,
        exports: Sequence[ExportSpec] = (),
        cache_imports: Sequence[RegistryCache] = (),
        cache_exports: Sequence[RegistryCache] = (),
        frontend_attrs: Mapping[str, str] | None = None,
        entitlements: Sequence[str] = (),
        on_progress: ProgressCallback | None = None,
        ref: str | None = None,
    ) -> SolveResult:
        """Build `definition`, export it, and return the exporter response.

        With `session`, the session is attached for the call unless it already
        is (see `attach()`), and its id goes into the request; a broken session
        fails the solve with its SessionError. `on_progress` gets every Status
        message. Cancelling the calling task cancels the build on the daemon and
        re-raises CancelledError; SolveCancelledError means the daemon cancelled.
        """
        request = control_pb2.SolveRequest(
            Ref=ref or new_ref(),
            Definition=definition,
            Session=session.id if session is not None else "",
            Exporters=[e.to_pb() for e in exports],
            FrontendAttrs=dict(frontend_attrs or {}),
            Entitlements=list(entitlements),
        )
        request.Cache.Imports.extend(c.import_entry() for c in cache_imports)
        request.Cache.Exports.extend(c.export_entry() for c in cache_exports)
        async with contextlib.AsyncExitStack() as stack:
            if session is not None and session.id not in self._attached:
                await stack.enter_async_context(session.attach(self.control))
            return await self._solve(request, session, on_progress)
        raise AssertionError("unreachable")

    async def _solve(
        self,
        request: control_pb2.SolveRequest,
        session: SessionLike | None,
        on_progress: ProgressCallback | None,
    ) -> SolveResult:
        status_call = self.control.Status(control_pb2.StatusRequest(Ref=request.Ref))
        solve_call = self.control.Solve(request)
        status_task = asyncio.create_task(_pump_status(status_call, on_progress))
        solve_task = asyncio.ensure_future(solve_call)
        waiters: set[asyncio.Future[Any]] = {solve_task, status_task}
        session_task: asyncio.Task[bool] | None = None
        if session is not None:
            session_task = asyncio.create_task(session.failed.wait())
            waiters.add(session_task)
        try:
            while not solve_task.done():
                done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                if session_task is not None and session_task in done and not solve_task.done():
                    assert session is not None
                    raise session.error or SessionError(f"session {session.id} failed")
                if status_task in done:
                    # A failed progress callback is the caller's bug: stop the build.
                    status_task.result()
                    waiters.discard(status_task)
            with _translated(f"solve {request.Ref}", solving=True):
                response = solve_task.result()
        except BaseException:
            # Early failure or our own cancellation: stop both calls on the daemon.
            # Without this the Status stream would wait ~6 s for a job that never came.
            solve_call.cancel()
            status_call.cancel()
            await _settle(solve_task, status_task, session_task)
            raise
        if session_task is not None:
            session_task.cancel()
        await self._drain(status_task, status_call)
        await _settle(session_task)
        return SolveResult(ref=request.Ref, exporter_response=dict(response.ExporterResponse))

    async def _drain(self, status_task: asyncio.Task[None], status_call: _StatusCall) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(status_task), self.options.status_drain_s)
        except TimeoutError:
            logger.debug("status stream still open %.1fs after solve", self.options.status_drain_s)
            status_call.cancel()
            await _settle(status_task)


async def _pump_status(call: _StatusCall, on_progress: ProgressCallback | None) -> None:
    """Feed Status messages to the callback until the stream ends.

    Status errors are not build errors: the daemon ends the stream with
    NOT_FOUND when a job never registered, and a dead daemon also fails Solve,
    which reports it. So they are logged, not raised.
    """
    try:
        async for message in call:
            if on_progress is not None:
                on_progress(message)
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.CANCELLED:
            logger.debug("status stream ended with %s: %s", exc.code().name, exc.details())


async def _settle(*tasks: asyncio.Future[Any] | None) -> None:
    """Cancel and await helper tasks so none outlives the solve."""
    pending = [t for t in tasks if t is not None]
    for t in pending:
        t.cancel()
    # return_exceptions: their errors were handled already; our own cancellation
    # while waiting here still propagates.
    await asyncio.gather(*pending, return_exceptions=True)
