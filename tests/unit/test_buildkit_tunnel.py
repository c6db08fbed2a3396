"""The in-process session server against an in-memory HTTP/2 client (h2), byte for byte.

The client plays grpc-go in the daemon: it sends requests, reads frames and
grants flow-control window; no sockets. The grpc.aio client through a fake
tunnel is in test_buildkit_session.py; the real daemon in tests/integration.
"""

from __future__ import annotations

import asyncio
import struct
import urllib.parse
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

from build_runner.buildkit.tunnel import (
    EOF,
    MethodRegistry,
    TunnelProtocolError,
    TunnelServer,
)


def _identity(data: bytes) -> bytes:
    return data


def _frame(message: bytes, *, compressed: bool = False) -> bytes:
    return struct.pack(">BI", int(compressed), len(message)) + message


def _unframe(data: bytes) -> list[bytes]:
    messages = []
    while data:
        _, length = struct.unpack_from(">BI", data)
        messages.append(data[5 : 5 + length])
        data = data[5 + length :]
    return messages


class Pair:
    """An h2 client connection wired to a TunnelServer through plain bytes."""

    def __init__(
        self, methods: dict[str, grpc.RpcMethodHandler[Any, Any]], *, window: int = 65535
    ) -> None:
        self.failures: list[str] = []
        self.server = TunnelServer(methods, on_failure=self.failures.append)
        self.client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.client.local_settings = h2.settings.Settings(
            client=True,
            initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window},
        )
        self.events: list[h2.events.Event] = []
        self.data_frames: dict[int, list[bytes]] = {}

    async def start(self) -> None:
        self.server.start()
        self.client.initiate_connection()
        await self.exchange()

    async def exchange(self, rounds: int = 20) -> None:
        """Move bytes both ways until neither side has more (handlers get to run)."""
        for _ in range(rounds):
            await asyncio.sleep(0)
            if data := self.client.data_to_send():
                self.server.receive_data(data)
            try:
                out = await asyncio.wait_for(self.server.next_output(1 << 30), 0.01)
            except TimeoutError:
                out = b""
            if out:
                for event in self.client.receive_data(out):
                    self.events.append(event)
                    if isinstance(event, h2.events.DataReceived):
                        self.data_frames.setdefault(event.stream_id, []).append(event.data)

    def call(self, path: str, *messages: bytes, end: bool = True) -> int:
        stream_id = self.client.get_next_available_stream_id()
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "session"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("dir-name", "context"),
        ]
        self.client.send_headers(stream_id, headers)
        body = b"".join(_frame(m) for m in messages)
        size = self.client.max_outbound_frame_size
        pieces = [body[i : i + size] for i in range(0, len(body), size)] or [b""]
        for i, piece in enumerate(pieces):
            self.client.send_data(stream_id, piece, end_stream=end and i == len(pieces) - 1)
        return stream_id

    def body(self, stream_id: int) -> bytes:
        return b"".join(self.data_frames.get(stream_id, []))

    def status(self, stream_id: int) -> tuple[str, str] | None:
        """(grpc-status, decoded grpc-message) once the call ended, from trailers or headers."""
        for event in self.events:
            if getattr(event, "stream_id", None) != stream_id:
                continue
            if isinstance(event, h2.events.TrailersReceived | h2.events.ResponseReceived):
                fields = {k.decode(): v.decode() for k, v in event.headers or []}
                if "grpc-status" in fields:
                    message = urllib.parse.unquote(fields.get("grpc-message", ""))
                    return fields["grpc-status"], message
        return None


def _unary(fn: Callable[[bytes, Any], Any]) -> grpc.RpcMethodHandler[Any, Any]:
    return grpc.unary_unary_rpc_method_handler(
        fn, request_deserializer=_identity, response_serializer=_identity
    )


def _bidi(fn: Callable[[Any, Any], Any]) -> grpc.RpcMethodHandler[Any, Any]:
    return grpc.stream_stream_rpc_method_handler(
        fn, request_deserializer=_identity, response_serializer=_identity
    )


async def _echo(request: bytes, context: Any) -> bytes:
    dir_name: str = dict(context.invocation_metadata())["dir-name"]
    return b"echo:" + request + b":" + dir_name.encode()


async def test_unary_call_gets_headers_message_and_ok_trailers() -> None:
    pair = Pair({"/t.S/Echo": _unary(_echo)})
    await pair.start()
    stream_id = pair.call("/t.S/Echo", b"hi")
    await pair.exchange()
    responses = [e for e in pair.events if isinstance(e, h2.events.ResponseReceived)]
    assert [(k, v) for k, v in responses[0].headers or [] if not k.startswith(b"grpc")] == [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
    ]
    assert _unframe(pair.body(stream_id)) == [b"echo:hi:context"]
    assert pair.status(stream_id) == ("0", "")
    assert any(isinstance(e, h2.events.StreamEnded) for e in pair.events)
    assert pair.failures == []


async def test_metadata_is_the_callers_only() -> None:
    seen: list[tuple[str, str]] = []

    async def record(request: bytes, context: Any) -> bytes:
        seen.extend(context.invocation_metadata())
        return b""

    pair = Pair({"/t.S/Record": _unary(record)})
    await pair.start()
    stream_id = pair.client.get_next_available_stream_id()
    pair.client.send_headers(
        stream_id,
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/t.S/Record"),
            (":authority", "session"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("grpc-timeout", "15S"),
            ("user-agent", "grpc-go/1.74.2"),
            ("exclude-patterns", "a"),
            ("exclude-patterns", "b%C3%A4"),
            ("exclude-patterns-encoded", "1"),
        ],
    )
    pair.client.send_data(stream_id, _frame(b""), end_stream=True)
    await pair.exchange()
    assert pair.status(stream_id) == ("0", "")
    # Repeated keys keep their order; sync.decode_metadata undoes the escaping.
    assert seen == [
        ("user-agent", "grpc-go/1.74.2"),
        ("exclude-patterns", "a"),
        ("exclude-patterns", "b%C3%A4"),
        ("exclude-patterns-encoded", "1"),
    ]


@pytest.mark.parametrize(
    ("path", "handler", "status"),
    [
        ("/t.S/Nope", None, ("12", "unknown method /t.S/Nope")),
        ("/t.S/Abort", "abort", ("5", "kein Zugriff: 100% «dir»\n")),
        ("/t.S/Bug", "bug", ("2", "Unexpected <class 'ValueError'>: broken")),
    ],
)
async def test_errors_end_with_status_and_encoded_message(
    path: str, handler: str | None, status: tuple[str, str]
) -> None:
    async def abort(request: bytes, context: Any) -> bytes:
        await context.abort(grpc.StatusCode.NOT_FOUND, "kein Zugriff: 100% «dir»\n")
        return b"unreachable"

    async def bug(request: bytes, context: Any) -> bytes:
        raise ValueError("broken")

    methods = {"/t.S/Abort": _unary(abort), "/t.S/Bug": _unary(bug)}
    pair = Pair(methods)
    await pair.start()
    stream_id = pair.call(path, b"x")
    await pair.exchange()
    assert pair.status(stream_id) == status
    assert pair.body(stream_id) == b""
    # grpc-message holds printable ASCII only (PROTOCOL-HTTP2.md).
    raw = [
        v
        for e in pair.events
        if isinstance(e, h2.events.ResponseReceived | h2.events.TrailersReceived)
        for k, v in e.headers or []
        if k == b"grpc-message"
    ]
    assert all(0x20 <= b <= 0x7E for value in raw for b in value)


async def test_output_waits_for_the_peers_window_and_trailers_come_last() -> None:
    chunk = b"x" * 1000

    async def many(requests: AsyncIterator[bytes], context: Any) -> None:
        for _ in range(50):
            await context.write(chunk)

    pair = Pair({"/t.S/Many": _bidi(many)}, window=4000)
    await pair.start()
    stream_id = pair.call("/t.S/Many")
    await pair.exchange()
    # Only the stream's initial window went out, and no status yet.
    assert len(pair.body(stream_id)) == 4000
    assert pair.status(stream_id) is None
    granted = 4000
    while len(pair.body(stream_id)) < 50 * (len(chunk) + 5):
        pair.client.increment_flow_control_window(3000, stream_id=stream_id)
        pair.client.increment_flow_control_window(3000)
        granted += 3000
        await pair.exchange(rounds=3)
        assert len(pair.body(stream_id)) <= granted
    assert _unframe(pair.body(stream_id)) == [chunk] * 50
    assert pair.status(stream_id) == ("0", "")


async def test_small_messages_share_data_frames() -> None:
    async def burst(requests: AsyncIterator[bytes], context: Any) -> None:
        for i in range(2000):
            await context.write(b"%d" % i)

    pair = Pair({"/t.S/Burst": _bidi(burst)}, window=1 << 20)
    await pair.start()
    pair.client.increment_flow_control_window(1 << 20)
    stream_id = pair.call("/t.S/Burst")
    await pair.exchange()
    body = pair.body(stream_id)
    assert _unframe(body) == [b"%d" % i for i in range(2000)]
    # 2,000 messages, about 14 KB: one or two DATA frames, not one per message.
    frame_size = pair.client.remote_settings.max_frame_size
    assert len(pair.data_frames[stream_id]) <= -(-len(body) // frame_size) + 1


async def test_requests_stream_in_and_end_with_eof() -> None:
    seen: list[object] = []

    async def collect(requests: AsyncIterator[bytes], context: Any) -> None:
        while (message := await context.read()) is not EOF:
            seen.append(message)
        seen.append(EOF)
        await context.write(b"done")

    pair = Pair({"/t.S/Collect": _bidi(collect)})
    await pair.start()
    stream_id = pair.call("/t.S/Collect", b"a", b"", b"c" * 40_000, end=False)
    await pair.exchange()
    assert seen == [b"a", b"", b"c" * 40_000]
    pair.client.end_stream(stream_id)
    await pair.exchange()
    assert seen[-1] is EOF
    assert _unframe(pair.body(stream_id)) == [b"done"]
    assert pair.status(stream_id) == ("0", "")


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (_frame(b"zz", compressed=True), ("12", "compressed messages")),
        (b"\x00\x00\x00", ("13", "request stream ended inside a message")),
        (struct.pack(">BI", 0, (16 << 20) + 1), None),
    ],
)
async def test_malformed_requests_end_the_call(raw: bytes, status: tuple[str, str] | None) -> None:
    async def collect(requests: AsyncIterator[bytes], context: Any) -> None:
        async for _ in requests:
            pass

    pair = Pair({"/t.S/Collect": _bidi(collect)})
    await pair.start()
    stream_id = pair.call("/t.S/Collect", end=False)
    pair.client.send_data(stream_id, raw, end_stream=True)
    await pair.exchange()
    if status is None:
        assert pair.status(stream_id) is not None
        code, message = pair.status(stream_id) or ("", "")
        assert code == "8"
        assert message.startswith("message of 16777217 bytes exceeds the limit")
    else:
        assert pair.status(stream_id) == status


async def test_reset_by_the_peer_cancels_the_handler() -> None:
    cancelled = asyncio.Event()

    async def wait(requests: AsyncIterator[bytes], context: Any) -> None:
        try:
            await context.read()
            await context.read()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    pair = Pair({"/t.S/Wait": _bidi(wait)})
    await pair.start()
    stream_id = pair.call("/t.S/Wait", b"one", end=False)
    await pair.exchange()
    pair.client.reset_stream(stream_id)
    await pair.exchange()
    await asyncio.wait_for(cancelled.wait(), 1)
    assert pair.status(stream_id) is None
    # Another call on the same connection still works.
    pair_methods_ok = pair.call("/t.S/Wait", b"a", b"b")
    await pair.exchange()
    assert pair.status(pair_methods_ok) == ("0", "")


async def test_close_cancels_calls_and_ends_output() -> None:
    started = asyncio.Event()

    async def hang(request: bytes, context: Any) -> bytes:
        started.set()
        await asyncio.sleep(3600)
        return b""

    pair = Pair({"/t.S/Hang": _unary(hang)})
    await pair.start()
    pair.call("/t.S/Hang", b"x")
    await pair.exchange()
    await asyncio.wait_for(started.wait(), 1)
    await pair.server.aclose()
    assert await pair.server.next_output(1024) is None
    names = {t.get_name() for t in asyncio.all_tasks() if not t.done()}
    assert not {n for n in names if n.startswith("session-call-")}


async def test_goaway_and_garbage_are_reported() -> None:
    pair = Pair({})
    await pair.start()
    pair.client.close_connection()
    await pair.exchange()
    assert pair.failures == ["buildkitd closed the session's HTTP/2 connection (GOAWAY 0)"]

    broken = Pair({})
    await broken.start()
    with pytest.raises(TunnelProtocolError, match="HTTP/2 error from buildkitd"):
        broken.server.receive_data(b"\x00\x00\x04\x08\x00\x00\x00\x00\x00" + b"\xff" * 4)


def test_registry_collects_generated_registrations() -> None:
    from build_runner._pb.buildkit import filesync_pb2_grpc

    registry = MethodRegistry()
    filesync_pb2_grpc.add_FileSyncServicer_to_server(  # type: ignore[no-untyped-call]
        filesync_pb2_grpc.FileSyncServicer(), registry
    )
    assert sorted(registry.methods) == [
        "/moby.filesync.v1.FileSync/DiffCopy",
        "/moby.filesync.v1.FileSync/TarStream",
    ]
    assert all(h.request_streaming and h.response_streaming for h in registry.methods.values())
