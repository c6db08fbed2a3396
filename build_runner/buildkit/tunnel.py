"""The session's gRPC server, served in-process over the tunnel's raw HTTP/2 bytes.

Owns HTTP/2 (the `h2` library, server side) and gRPC's framing on top of it
(grpc/grpc `doc/PROTOCOL-HTTP2.md`): bytes from the daemon go in through
`receive_data`, bytes for the daemon come out of `next_output`, and every call
runs a grpc.aio-style servicer method with a small stand-in for its context
(`invocation_metadata`, `read`, `write`, `abort`). It never touches a socket or
a thread; `session.py` moves the bytes between it and `Control.Session`.

Why not a real grpc.aio server: the tunnel then needs a private socket, a byte
pump and a second gRPC stack, and an upload of thousands of small files pays
for every packet twice. Here a packet costs one serialization and a buffer
append; many packets share one DATA frame and one tunnel message.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import struct
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions

logger = logging.getLogger(__name__)

# gRPC's length-prefixed message: a compressed flag byte and a big-endian
# uint32 length (PROTOCOL-HTTP2.md "Length-Prefixed-Message").
_PREFIX = struct.Struct(">BI")
# Messages larger than this are refused, as the Go client's limit (16 MiB).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# A call's buffered output is pushed into HTTP/2 at this size without waiting for
# the handler to yield; DATA frames are cut from it at the peer's frame size.
FLUSH_BYTES = 256 * 1024
# A writer waits while more than this is buffered but not yet allowed out by the
# peer's flow-control window: this bounds memory per call.
HIGH_WATER_BYTES = 4 * 1024 * 1024

# Request headers that belong to HTTP/2 and gRPC framing, not to the call's
# metadata (grpc.aio leaves them out of invocation_metadata(), as do we with grpc-*).
_TRANSPORT_HEADERS = frozenset({"content-type", "te"})

# What a servicer method gets from `context.read()` at the end of the requests;
# sync.py compares against grpc.aio's own marker. grpc-stubs doesn't declare it.
EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]


class AbortError(Exception):
    """Raised by `context.abort()`: ends the call with this status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class TunnelProtocolError(Exception):
    """The daemon broke HTTP/2 on the tunnel; the connection is unusable."""


class MethodRegistry:
    """Collects method handlers from the generated `add_*Servicer_to_server` functions.

    It stands in for the server those functions expect, so every servicer keeps
    its generated registration (paths, (de)serializers, call shape).
    """

    def __init__(self) -> None:
        self.methods: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def add_generic_rpc_handlers(self, handlers: Iterable[object]) -> None:
        """Ignored: the same handlers arrive through `add_registered_method_handlers`."""

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        for name, handler in handlers.items():
            self.methods[f"/{service}/{name}"] = handler


def _encode_grpc_message(text: str) -> str:
    """Percent-encode a status message as grpc-message wants (PROTOCOL-HTTP2.md)."""
    return urllib.parse.quote(text, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")


class _Call:
    """One gRPC call: the servicer's context, its buffered output, its inbound messages."""

    def __init__(
        self,
        server: TunnelServer,
        stream_id: int,
        metadata: tuple[tuple[str, str], ...],
        handler: grpc.RpcMethodHandler[Any, Any],
    ) -> None:
        self._server = server
        self.stream_id = stream_id
        self._metadata = metadata
        self._handler = handler
        self._inbound = bytearray()
        self._broken = False
        self._messages: asyncio.Queue[object] = asyncio.Queue()
        self.pending = bytearray()
        self.drained = asyncio.Event()
        self.drained.set()
        self._flush_scheduled = False
        self._headers_sent = False
        self.closed = False
        self.task: asyncio.Task[None] | None = None

    # --- the servicer's view (a subset of grpc.aio.ServicerContext) -------------

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    async def read(self) -> object:
        """The next request message, or `EOF` once the daemon half-closed."""
        item = await self._messages.get()
        if isinstance(item, BaseException):
            raise item
        return item

    async def write(self, message: Any) -> None:
        """Queue one response message; waits only while the peer's window is full."""
        data = self._handler.response_serializer(message)  # type: ignore[misc]
        self.pending += _PREFIX.pack(0, len(data))
        self.pending += data
        if len(self.pending) >= FLUSH_BYTES:
            self._server.flush(self)
            while len(self.pending) >= HIGH_WATER_BYTES and not self.closed:
                self.drained.clear()
                await self.drained.wait()
        elif not self._flush_scheduled:
            # Flushed when the handler next yields, so a burst of small
            # messages goes out in one DATA frame.
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._scheduled_flush)

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise AbortError(code, details)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self._server.flush(self)

    # --- fed by the server ------------------------------------------------------

    def receive(self, data: bytes) -> None:
        """Bytes of the request stream; complete messages (or the error) go to `read()`."""
        if self._broken:
            return
        self._inbound += data
        try:
            while len(self._inbound) >= _PREFIX.size:
                compressed, length = _PREFIX.unpack_from(self._inbound)
                if compressed:
                    # We announce no grpc-accept-encoding, so a peer must not compress.
                    raise AbortError(grpc.StatusCode.UNIMPLEMENTED, "compressed messages")
                if length > MAX_MESSAGE_BYTES:
                    raise AbortError(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"message of {length} bytes exceeds the limit of {MAX_MESSAGE_BYTES}",
                    )
                end = _PREFIX.size + length
                if len(self._inbound) < end:
                    return
                body = bytes(self._inbound[_PREFIX.size : end])
                del self._inbound[:end]
                try:
                    message = self._handler.request_deserializer(body)  # type: ignore[misc]
                except Exception as exc:
                    raise AbortError(
                        grpc.StatusCode.INTERNAL, f"cannot decode the request: {exc}"
                    ) from exc
                self._messages.put_nowait(message)
        except AbortError as exc:
            # The handler's next read() raises it, and the call ends with its status.
            self._broken = True
            self._inbound.clear()
            self._messages.put_nowait(exc)

    def end_of_requests(self) -> None:
        if self._broken:
            return
        if self._inbound:
            self._messages.put_nowait(
                AbortError(grpc.StatusCode.INTERNAL, "request stream ended inside a message")
            )
        self._messages.put_nowait(EOF)

    # --- running the handler -----------------------------------------------------

    async def run(self) -> None:
        code, details = grpc.StatusCode.OK, ""
        try:
            await self._dispatch()
        except AbortError as exc:
            code, details = exc.code, exc.details
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # grpc.aio's reply to a handler's bug, so the daemon's error reads the same.
            logger.exception("session call %s failed", self.stream_id)
            code, details = grpc.StatusCode.UNKNOWN, f"Unexpected {type(exc)}: {exc}"
        await self._server.finish(self, code, details)

    async def _dispatch(self) -> None:
        handler = self._handler
        behavior: Callable[..., Any]
        if handler.request_streaming:
            request: Any = self._requests()
            behavior = handler.stream_stream if handler.response_streaming else handler.stream_unary  # type: ignore[assignment]
        else:
            request = await self.read()
            if request is EOF:
                raise AbortError(grpc.StatusCode.INTERNAL, "no request message")
            behavior = handler.unary_stream if handler.response_streaming else handler.unary_unary  # type: ignore[assignment]
        result = behavior(request, self)
        if inspect.isasyncgen(result):
            async for message in result:
                await self.write(message)
            return
        response = await result
        if response is not None:
            await self.write(response)

    async def _requests(self) -> AsyncIterator[Any]:
        while (message := await self.read()) is not EOF:
            yield message

    def response_headers_once(self) -> list[tuple[str, str]] | None:
        if self._headers_sent:
            return None
        self._headers_sent = True
        return [(":status", "200"), ("content-type", "application/grpc")]


class TunnelServer:
    """An HTTP/2 gRPC server over a byte stream whose peer (the daemon) is the client."""

    def __init__(
        self,
        methods: Mapping[str, grpc.RpcMethodHandler[Any, Any]],
        *,
        on_failure: Callable[[str], None],
    ) -> None:
        self._methods = dict(methods)
        self._on_failure = on_failure
        self._conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self._calls: dict[int, _Call] = {}
        self._output = bytearray()
        self._output_ready = asyncio.Event()
        self._closed = False

    def start(self) -> None:
        """Queue our connection preface, a SETTINGS frame (RFC 9113 §3.4).

        h2's default receive windows suffice: the daemon sends little (file
        requests and health checks), and h2 re-opens them as we acknowledge data.
        """
        self._conn.initiate_connection()
        self._pull_output()

    # --- bytes in and out --------------------------------------------------------

    async def next_output(self, limit: int) -> bytes | None:
        """Up to `limit` bytes for the daemon, waiting for some; None once closed."""
        while not self._output:
            if self._closed:
                return None
            self._output_ready.clear()
            await self._output_ready.wait()
        data = bytes(self._output[:limit])
        del self._output[:limit]
        return data

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the daemon. Raises TunnelProtocolError if it broke HTTP/2."""
        try:
            events = self._conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._pull_output()  # h2 queued a GOAWAY
            raise TunnelProtocolError(f"HTTP/2 error from buildkitd: {exc}") from exc
        for event in events:
            self._handle(event)
        self._pull_output()

    def _pull_output(self) -> None:
        data = self._conn.data_to_send()
        if data:
            self._output += data
            self._output_ready.set()

    # --- events --------------------------------------------------------------------

    def _handle(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._start_call(event.stream_id, event.headers or [])
        elif isinstance(event, h2.events.DataReceived):
            self._conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            call = self._calls.get(event.stream_id)
            if call is not None and event.data:
                call.receive(event.data)
        elif isinstance(event, h2.events.StreamEnded):
            call = self._calls.get(event.stream_id)
            if call is not None:
                call.end_of_requests()
        elif isinstance(event, h2.events.StreamReset):
            # The daemon cancelled the call (or its deadline passed).
            call = self._calls.pop(event.stream_id, None)
            if call is not None:
                call.closed = True
                call.drained.set()
                if call.task is not None:
                    call.task.cancel()
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            for call in list(self._calls.values()):
                self.flush(call)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._on_failure(
                f"buildkitd closed the session's HTTP/2 connection (GOAWAY {event.error_code!s})"
            )

    def _start_call(self, stream_id: int, raw: Iterable[tuple[bytes, bytes]]) -> None:
        path = ""
        metadata: list[tuple[str, str]] = []
        for raw_name, raw_value in raw:
            name = raw_name.decode("ascii", errors="replace")
            value = raw_value.decode("utf-8", errors="replace")
            if name == ":path":
                path = value
            elif not name.startswith((":", "grpc-")) and name not in _TRANSPORT_HEADERS:
                metadata.append((name, value))
        handler = self._methods.get(path)
        if handler is None:
            self._send_trailers_only(
                stream_id, grpc.StatusCode.UNIMPLEMENTED, f"unknown method {path}"
            )
            return
        call = _Call(self, stream_id, tuple(metadata), handler)
        self._calls[stream_id] = call
        call.task = asyncio.get_running_loop().create_task(call.run(), name=f"session-call-{path}")

    # --- sending -----------------------------------------------------------------

    def flush(self, call: _Call) -> None:
        """Move a call's buffered output into DATA frames, as far as the window allows."""
        if call.closed or not call.pending:
            return
        headers = call.response_headers_once()
        try:
            if headers is not None:
                self._conn.send_headers(call.stream_id, headers)
            pending = call.pending
            frame_size = self._conn.max_outbound_frame_size
            while pending:
                size = min(
                    len(pending), frame_size, self._conn.local_flow_control_window(call.stream_id)
                )
                if size <= 0:
                    break
                self._conn.send_data(call.stream_id, bytes(pending[:size]))
                del pending[:size]
        except h2.exceptions.ProtocolError:
            # The stream or the connection has closed under us (reset, GOAWAY).
            call.closed = True
        if len(call.pending) < HIGH_WATER_BYTES:
            call.drained.set()
        self._pull_output()

    async def finish(self, call: _Call, code: grpc.StatusCode, details: str) -> None:
        """Send the rest of a call's output, then its status as trailers."""
        # Whatever the handler wrote goes first, also before an error status
        # (DiffCopy sends an ERR packet, then aborts).
        self.flush(call)
        while call.pending and not call.closed:
            call.drained.clear()
            # Set by the flush that follows every window update.
            await call.drained.wait()
            self.flush(call)
        self._calls.pop(call.stream_id, None)
        if call.closed:
            return
        trailers = [("grpc-status", str(code.value[0]))]
        if details:
            trailers.append(("grpc-message", _encode_grpc_message(details)))
        headers = call.response_headers_once()
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self._conn.send_headers(call.stream_id, [*(headers or []), *trailers], end_stream=True)
        call.closed = True
        self._pull_output()

    def _send_trailers_only(self, stream_id: int, code: grpc.StatusCode, details: str) -> None:
        headers = [
            (":status", "200"),
            ("content-type", "application/grpc"),
            ("grpc-status", str(code.value[0])),
            ("grpc-message", _encode_grpc_message(details)),
        ]
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self._conn.send_headers(stream_id, headers, end_stream=True)
        self._pull_output()

    # --- shutdown ------------------------------------------------------------------

    async def aclose(self) -> None:
        """Cancel every call still running and wait for them; `next_output` then ends."""
        tasks = [c.task for c in self._calls.values() if c.task is not None]
        for call in self._calls.values():
            call.closed = True
            call.drained.set()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._calls.clear()
        self._closed = True
        self._output_ready.set()
