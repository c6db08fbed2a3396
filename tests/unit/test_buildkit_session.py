"""The session tunnel against an in-process fake Control.Session server.

The fake plays the daemon's transport only: it turns the Session stream back
into a byte stream on a second Unix socket, where a real grpc.aio client (as
the daemon's grpc-go client would) calls Health, Auth, Secrets and FileSync
through the tunnel. The real-daemon proof is tests/integration/test_buildkit_session.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import hashlib
import json
import os
import tempfile
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from build_runner._pb.buildkit import (
    auth_pb2,
    auth_pb2_grpc,
    control_pb2,
    control_pb2_grpc,
    filesync_pb2_grpc,
    secrets_pb2,
    secrets_pb2_grpc,
)
from build_runner._pb.buildkit.fsutil import wire_pb2
from build_runner.buildkit.auth import Credentials
from build_runner.buildkit.errors import SessionError
from build_runner.buildkit.session import Session
from tests.unit.fsutil_receiver import FakeReceiver

SECRET_PASSWORD = "pw-7f1c9e-never-on-disk"
SECRET_VALUE = b"secret-value-3b8a-never-on-disk"


async def _until_first_ends(*coros: Coroutine[Any, Any, object]) -> None:
    """Run these until one ends; the others are cancelled and awaited, also on cancellation."""
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class FakeControl(control_pb2_grpc.ControlServicer):
    """A Control server whose Session bridges the stream to a Unix socket.

    Everything a Session call opens (the listener, the connections it accepts,
    its bridging tasks) is closed and awaited before the call ends, also when
    the client cancels it (grpc.aio then cancels this handler).
    """

    def __init__(self, tunnel_path: str) -> None:
        self.tunnel_path = tunnel_path
        self.metadata: list[tuple[str, str]] = []
        self.listening = asyncio.Event()
        self.break_tunnel = asyncio.Event()
        self.ended = asyncio.Event()

    async def Session(
        self,
        request_iterator: AsyncIterator[control_pb2.BytesMessage],
        context: grpc.aio.ServicerContext[control_pb2.BytesMessage, control_pb2.BytesMessage],
    ) -> None:
        self.metadata = [(k, str(v)) for k, v in context.invocation_metadata() or ()]
        await context.send_initial_metadata(())
        connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        connected = asyncio.Event()

        def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            # Every connection is kept, so a second one is closed too.
            connections.append((reader, writer))
            connected.set()

        server = await asyncio.start_unix_server(accept, self.tunnel_path)
        self.listening.set()
        try:
            await _until_first_ends(connected.wait(), self.break_tunnel.wait())
            if not self.break_tunnel.is_set():
                reader, writer = connections[0]

                async def to_daemon() -> None:
                    async for message in request_iterator:
                        writer.write(message.data)
                        await writer.drain()

                async def from_daemon() -> None:
                    while data := await reader.read(65536):
                        await context.write(control_pb2.BytesMessage(data=data))

                await _until_first_ends(to_daemon(), from_daemon(), self.break_tunnel.wait())
        finally:
            server.close()
            for _, conn in connections:
                conn.close()
            await asyncio.gather(
                server.wait_closed(),
                *(conn.wait_closed() for _, conn in connections),
                return_exceptions=True,
            )
            self.ended.set()
        if self.break_tunnel.is_set():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "fake daemon went away")


@pytest.fixture
async def fake_daemon(
    tmp_path: Path,
) -> AsyncIterator[tuple[FakeControl, control_pb2_grpc.ControlStub, grpc.aio.Channel]]:
    control_path = str(tmp_path / "control.sock")
    fake = FakeControl(str(tmp_path / "tunnel.sock"))
    server = grpc.aio.server()
    control_pb2_grpc.add_ControlServicer_to_server(fake, server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"unix:{control_path}")
    await server.start()
    control_channel = grpc.aio.insecure_channel(f"unix:{control_path}")
    tunnel_channel = grpc.aio.insecure_channel(f"unix:{fake.tunnel_path}")
    stub = control_pb2_grpc.ControlStub(control_channel)  # type: ignore[no-untyped-call]
    try:
        yield fake, stub, tunnel_channel
    finally:
        await tunnel_channel.close(None)
        await control_channel.close(None)
        await server.stop(None)


def _credentials() -> Credentials:
    auth = base64.b64encode(f"builder:{SECRET_PASSWORD}".encode()).decode()
    return Credentials.from_json(json.dumps({"auths": {"127.0.0.1:5000": {"auth": auth}}}))


@pytest.fixture
def context_dir(tmp_path: Path) -> Path:
    root = tmp_path / "ctx"
    (root / "src").mkdir(parents=True)
    (root / "src" / "main.py").write_bytes(b"print('hi')\n")
    (root / "big.bin").write_bytes(os.urandom(700_000))
    (root / "skip.log").write_bytes(b"log")
    (root / "ünï côdé").write_bytes(b"odd")
    (root / "link").symlink_to("src/main.py")
    for i in range(300):
        (root / "src" / f"small{i:03}.txt").write_bytes(f"file {i}\n".encode() * (i % 7))
    return root


async def _diffcopy(
    channel: grpc.aio.Channel, metadata: list[tuple[str, str]], receiver: FakeReceiver
) -> None:
    stub = filesync_pb2_grpc.FileSyncStub(channel)  # type: ignore[no-untyped-call]
    call = stub.DiffCopy(metadata=metadata)
    while not receiver.finished:
        packet = await call.read()
        assert isinstance(packet, wire_pb2.Packet), f"stream ended early: {packet!r}"
        for answer in receiver.receive(packet):
            await call.write(answer)
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK


async def test_headers_and_every_attachable_through_the_tunnel(
    fake_daemon: tuple[FakeControl, control_pb2_grpc.ControlStub, grpc.aio.Channel],
    context_dir: Path,
) -> None:
    fake, stub, tunnel = fake_daemon
    session = Session(
        credentials=_credentials(),
        local_dirs={"context": context_dir},
        secrets={"token": SECRET_VALUE},
        shared_key="key-1",
    )
    async with asyncio.timeout(60), session.attach(stub):
        await fake.listening.wait()
        headers: dict[str, list[str]] = {}
        for key, value in fake.metadata:
            headers.setdefault(key, []).append(value)
        assert headers["x-docker-expose-session-uuid"] == [session.id]
        assert len(session.id) == 25
        assert headers["x-docker-expose-session-sharedkey"] == ["key-1"]
        methods = headers["x-docker-expose-session-grpc-method"]
        for expected in [
            "/grpc.health.v1.Health/Check",
            "/moby.filesync.v1.Auth/Credentials",
            "/moby.filesync.v1.Auth/GetTokenAuthority",
            "/moby.filesync.v1.FileSync/DiffCopy",
            "/moby.buildkit.secrets.v1.Secrets/GetSecret",
        ]:
            assert expected in methods

        health = health_pb2_grpc.HealthStub(tunnel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

        auth = auth_pb2_grpc.AuthStub(tunnel)  # type: ignore[no-untyped-call]
        creds = await auth.Credentials(auth_pb2.CredentialsRequest(Host="127.0.0.1:5000"))
        assert (creds.Username, creds.Secret) == ("builder", SECRET_PASSWORD)
        unknown = await auth.Credentials(auth_pb2.CredentialsRequest(Host="other:5000"))
        assert (unknown.Username, unknown.Secret) == ("", "")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await auth.GetTokenAuthority(auth_pb2.GetTokenAuthorityRequest(Host="x"))
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED

        secrets = secrets_pb2_grpc.SecretsStub(tunnel)  # type: ignore[no-untyped-call]
        got = await secrets.GetSecret(secrets_pb2.GetSecretRequest(ID="token"))
        assert got.data == SECRET_VALUE
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await secrets.GetSecret(secrets_pb2.GetSecretRequest(ID="nope"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND

        receiver = FakeReceiver(eager=True)
        metadata = [
            ("dir-name", "context"),
            ("exclude-patterns", "*.log"),
            ("exclude-patterns", "%C3%BCn%C3%AF+*"),  # query-escaped "ünï *"
            ("exclude-patterns-encoded", "1"),
        ]
        await _diffcopy(tunnel, metadata, receiver)
        digests = receiver.digests()
        assert "skip.log" not in receiver.by_path()
        assert "ünï côdé" not in receiver.by_path()
        assert receiver.by_path()["link"].linkname == b"src/main.py"
        for rel in ["big.bin", "src/main.py", "src/small299.txt", "src/small000.txt"]:
            assert digests[rel] == hashlib.sha256((context_dir / rel).read_bytes()).hexdigest()
        assert len(digests) == 302

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _diffcopy(tunnel, [("dir-name", "other")], FakeReceiver())
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert "no access allowed" in (info.value.details() or "")
        assert not session.failed.is_set()


async def test_nothing_on_disk_and_secrets_stay_off_disk(
    fake_daemon: tuple[FakeControl, control_pb2_grpc.ControlStub, grpc.aio.Channel],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake, stub, tunnel = fake_daemon
    scratch = tmp_path / "t"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    session = Session(credentials=_credentials(), secrets={"token": SECRET_VALUE})
    async with asyncio.timeout(30), session.attach(stub):
        await fake.listening.wait()
        # The session is served in-process: no socket anyone else could reach.
        assert os.listdir(scratch) == []
        assert not hasattr(session, "socket_path")
        auth = auth_pb2_grpc.AuthStub(tunnel)  # type: ignore[no-untyped-call]
        await auth.Credentials(auth_pb2.CredentialsRequest(Host="127.0.0.1:5000"))
        secrets = secrets_pb2_grpc.SecretsStub(tunnel)  # type: ignore[no-untyped-call]
        await secrets.GetSecret(secrets_pb2.GetSecretRequest(ID="token"))
    assert os.listdir(scratch) == []
    for dirpath, _, files in os.walk(tmp_path):
        for name in files:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                assert SECRET_PASSWORD.encode() not in data, path
                assert SECRET_VALUE not in data, path
    assert SECRET_PASSWORD not in repr(session)
    assert "token" in repr(session)


_IN_SESSION: contextvars.ContextVar[bool] = contextvars.ContextVar("in_session", default=False)


@contextlib.contextmanager
def _tasks_started_in_session() -> Iterator[list[asyncio.Task[Any]]]:
    """Every task created, directly or by its tasks, where `_IN_SESSION` is set.

    A task inherits its creator's context, so this finds the tasks started on
    behalf of the session, also inside grpc.aio, and not the fake daemon's.
    """
    loop = asyncio.get_running_loop()
    previous = loop.get_task_factory()
    started: list[asyncio.Task[Any]] = []

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, /, **kwargs: Any) -> asyncio.Task[Any]:
        task = asyncio.Task(coro, loop=loop, **kwargs)
        if _IN_SESSION.get():
            started.append(task)
        return task

    loop.set_task_factory(factory)
    try:
        yield started
    finally:
        loop.set_task_factory(previous)


async def test_broken_tunnel_sets_failed_with_a_clear_error(
    fake_daemon: tuple[FakeControl, control_pb2_grpc.ControlStub, grpc.aio.Channel],
) -> None:
    fake, stub, tunnel = fake_daemon
    session = Session()
    with _tasks_started_in_session() as started:
        async with asyncio.timeout(30):
            marked = _IN_SESSION.set(True)
            async with session.attach(stub):
                _IN_SESSION.reset(marked)
                await fake.listening.wait()
                health = health_pb2_grpc.HealthStub(tunnel)
                await health.Check(health_pb2.HealthCheckRequest(service=""))
                fake.break_tunnel.set()
                await session.failed.wait()
            # attach() returns only once all it started has ended: after a failed
            # call nobody else would cancel what still waits for the tunnel.
            assert started
            assert [t for t in started if not t.done()] == []
    assert isinstance(session.error, SessionError)
    code = session.error.code
    # The fake's abort races its own stream teardown: grpc reports either our
    # UNAVAILABLE or, now and then, INTERNAL. The real-daemon test pins UNAVAILABLE.
    assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
    assert str(session.error).startswith(f"session tunnel to buildkitd broke: {code.name}: ")
    if code == grpc.StatusCode.UNAVAILABLE:
        assert str(session.error).endswith("fake daemon went away")


async def test_clean_exit_leaves_no_failure_and_no_tasks(
    fake_daemon: tuple[FakeControl, control_pb2_grpc.ControlStub, grpc.aio.Channel],
) -> None:
    fake, stub, _ = fake_daemon
    session = Session()
    threads_before = set(threading.enumerate())
    async with asyncio.timeout(30):
        async with session.attach(stub):
            await fake.listening.wait()
            # Served on the caller's loop: the session starts no thread of its own.
            assert set(threading.enumerate()) <= threads_before
        await fake.ended.wait()
    assert not session.failed.is_set()
    assert session.error is None
    names = {t.get_name() for t in asyncio.all_tasks() if not t.done()}
    assert not {n for n in names if n.startswith(("session-", "diffcopy-"))}


async def test_dead_daemon_fails_fast(tmp_path: Path) -> None:
    channel = grpc.aio.insecure_channel(f"unix:{tmp_path / 'nobody-listens.sock'}")
    stub = control_pb2_grpc.ControlStub(channel)  # type: ignore[no-untyped-call]
    session = Session(connect_timeout_s=20)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        with pytest.raises(SessionError, match="UNAVAILABLE") as info:
            async with asyncio.timeout(30), session.attach(stub):
                pytest.fail("attached to a daemon that does not exist")
    finally:
        await channel.close(None)
    assert loop.time() - started < 10
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert "No such file or directory" in str(info.value)


async def test_silent_daemon_times_out(tmp_path: Path) -> None:
    class SilentControl(control_pb2_grpc.ControlServicer):
        async def Session(
            self,
            request_iterator: AsyncIterator[control_pb2.BytesMessage],
            context: grpc.aio.ServicerContext[control_pb2.BytesMessage, control_pb2.BytesMessage],
        ) -> None:
            await asyncio.sleep(3600)

    server = grpc.aio.server()
    control_pb2_grpc.add_ControlServicer_to_server(SilentControl(), server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"unix:{tmp_path / 'c.sock'}")
    await server.start()
    channel = grpc.aio.insecure_channel(f"unix:{tmp_path / 'c.sock'}")
    stub = control_pb2_grpc.ControlStub(channel)  # type: ignore[no-untyped-call]
    try:
        with pytest.raises(SessionError, match="did not answer"):
            async with asyncio.timeout(30), Session(connect_timeout_s=0.5).attach(stub):
                pytest.fail("attached to a daemon that never answered")

        # A caller that gives up while attaching (cancels) leaves nothing behind.
        async def attach_forever() -> None:
            async with Session(connect_timeout_s=3600).attach(stub):
                pytest.fail("attached to a daemon that never answered")

        attaching = asyncio.create_task(attach_forever())
        await asyncio.sleep(0.3)
        attaching.cancel()
        with pytest.raises(asyncio.CancelledError):
            await attaching
        assert not [t for t in threading.enumerate() if t.name.startswith("session-server")]
    finally:
        await channel.close(None)
        with contextlib.suppress(Exception):
            await server.stop(None)


async def _read_until_error(
    call: grpc.aio.StreamStreamCall[wire_pb2.Packet, wire_pb2.Packet],
) -> tuple[list[wire_pb2.Packet], grpc.aio.AioRpcError]:
    packets: list[wire_pb2.Packet] = []
    try:
        while isinstance(packet := await call.read(), wire_pb2.Packet):
            packets.append(packet)
    except grpc.aio.AioRpcError as exc:
        return packets, exc
    raise AssertionError(f"stream ended with {await call.code()} after {len(packets)} packets")


async def test_diffcopy_ends_cleanly_when_the_receiver_misbehaves(
    fake_daemon: tuple[FakeControl, control_pb2_grpc.ControlStub, grpc.aio.Channel],
    context_dir: Path,
) -> None:
    fake, stub, tunnel = fake_daemon
    session = Session(local_dirs={"context": context_dir})
    sync = filesync_pb2_grpc.FileSyncStub(tunnel)  # type: ignore[no-untyped-call]
    async with asyncio.timeout(30), session.attach(stub):
        await fake.listening.wait()

        # The receiver aborts with ERR: the sender stops and says why.
        call = sync.DiffCopy(metadata=[("dir-name", "context")])
        first = await call.read()
        assert isinstance(first, wire_pb2.Packet)
        await call.write(wire_pb2.Packet(type=wire_pb2.Packet.PACKET_ERR, data=b"disk full"))
        _, error = await _read_until_error(call)
        assert error.code() == grpc.StatusCode.ABORTED
        assert error.details() == "error from receiver: disk full"

        # The receiver half-closes before FIN: ERR packet, then INTERNAL.
        call = sync.DiffCopy(metadata=[("dir-name", "context")])
        await call.done_writing()
        packets, error = await _read_until_error(call)
        assert error.code() == grpc.StatusCode.INTERNAL
        assert "receiver closed the stream before FIN" in (error.details() or "")
        assert packets[-1].type == wire_pb2.Packet.PACKET_ERR

        # The session itself is unharmed.
        health = health_pb2_grpc.HealthStub(tunnel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert not session.failed.is_set()


async def test_health_silence_fails_the_session(
    fake_daemon: tuple[FakeControl, control_pb2_grpc.ControlStub, grpc.aio.Channel],
) -> None:
    fake, stub, tunnel = fake_daemon
    health = health_pb2_grpc.HealthStub(tunnel)
    session = Session(health_silence_s=1.0)
    async with asyncio.timeout(30), session.attach(stub):
        await fake.listening.wait()
        # Checks every 0.3 s keep the session alive past the silence limit...
        loop = asyncio.get_running_loop()
        until = loop.time() + 2.5
        while loop.time() < until:
            await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert not session.failed.is_set()
            await asyncio.sleep(0.3)
        # ...and their absence fails it, as the daemon has dropped us by then.
        await asyncio.wait_for(session.failed.wait(), 5)
    assert isinstance(session.error, SessionError)
    assert str(session.error).startswith("buildkitd stopped health-checking the session")
