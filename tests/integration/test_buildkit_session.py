"""The client session against the real buildkitd v0.32.2 and the htpasswd registry.

Each build is a hand-made Definition solved over Control.Solve with our
Session attached: the local context is uploaded through our FileSync sender,
the base image pull and the push authenticate only with credentials our Auth
servicer serves (the daemon's own DOCKER_CONFIG is empty), and secrets come
from our Secrets servicer. Results are read back from the pushed image's
layers, so what the daemon received is checked byte for byte.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import gzip
import hashlib
import io
import json
import logging
import os
import secrets
import signal
import tarfile
import urllib.request
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path

import grpc
import pytest

from build_runner._pb.buildkit import control_pb2, control_pb2_grpc, ops_pb2
from build_runner.buildkit.auth import Credentials
from build_runner.buildkit.errors import SessionError
from build_runner.buildkit.session import Session
from tests.testbed.buildkit import BuildKit, start_buildkitd
from tests.testbed.registry import Registry

pytestmark = pytest.mark.buildkit

SOLVE_TIMEOUT_S = 300.0
LAYER_MEDIA_SUFFIXES = ("tar+gzip", "tar.gzip", "tar")


# --- a tiny hand-built LLB ---------------------------------------------------------


class Graph:
    """Ops serialized in dependency order, keyed by digest, as a Definition wants."""

    def __init__(self) -> None:
        self.ops: list[bytes] = []
        self.metadata: dict[str, ops_pb2.OpMetadata] = {}

    def add(self, op: ops_pb2.Op, name: str) -> str:
        data = op.SerializeToString(deterministic=True)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if digest not in self.metadata:
            self.ops.append(data)
            self.metadata[digest] = ops_pb2.OpMetadata(description={"llb.customname": name})
        return digest

    def definition(self, result: str) -> ops_pb2.Definition:
        terminal = ops_pb2.Op(inputs=[ops_pb2.Input(digest=result, index=0)])
        self.add(terminal, "terminal")
        return ops_pb2.Definition(**{"def": self.ops}, metadata=self.metadata)


def local_source(graph: Graph, name: str, attrs: Mapping[str, str] | None = None) -> str:
    source = ops_pb2.SourceOp(
        identifier=f"local://{name}",
        attrs={"local.sharedkeyhint": name, "local.unique": secrets.token_hex(8), **(attrs or {})},
    )
    return graph.add(ops_pb2.Op(source=source), f"local {name}")


def image_source(graph: Graph, ref: str) -> str:
    op = ops_pb2.Op(
        source=ops_pb2.SourceOp(identifier=f"docker-image://{ref}"),
        platform=ops_pb2.Platform(Architecture="amd64", OS="linux"),
    )
    return graph.add(op, f"image {ref}")


def run(graph: Graph, base: str, script: str, *, mounts: Sequence[ops_pb2.Mount] = ()) -> str:
    exec_op = ops_pb2.ExecOp(
        meta=ops_pb2.Meta(
            args=["/bin/sh", "-c", script],
            env=["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            cwd="/",
        ),
        mounts=[ops_pb2.Mount(input=0, dest="/", output=0), *mounts],
    )
    op = ops_pb2.Op(
        inputs=[ops_pb2.Input(digest=base, index=0)],
        exec=exec_op,
        platform=ops_pb2.Platform(Architecture="amd64", OS="linux"),
    )
    return graph.add(op, script[:60])


def copy_into_scratch(graph: Graph, source: str) -> str:
    copy = ops_pb2.FileActionCopy(
        src="/",
        dest="/",
        mode=-1,
        timestamp=-1,
        dirCopyContents=True,
        createDestPath=True,
        allowWildcard=True,
        allowEmptyWildcard=True,
    )
    action = ops_pb2.FileAction(input=-1, secondaryInput=0, output=0, copy=copy)
    op = ops_pb2.Op(
        inputs=[ops_pb2.Input(digest=source, index=0)], file=ops_pb2.FileOp(actions=[action])
    )
    return graph.add(op, "copy context")


# --- driving the daemon and reading the result ----------------------------------------


@pytest.fixture
async def control(buildkitd: BuildKit) -> AsyncIterator[control_pb2_grpc.ControlStub]:
    channel = grpc.aio.insecure_channel(buildkitd.address.replace("unix://", "unix:", 1))
    try:
        yield control_pb2_grpc.ControlStub(channel)  # type: ignore[no-untyped-call]
    finally:
        await channel.close(None)


async def solve(
    control: control_pb2_grpc.ControlStub,
    session: Session,
    definition: ops_pb2.Definition,
    *,
    push: str | None = None,
) -> dict[str, str]:
    """Solve with the session attached; a broken session fails the test instead of hanging."""
    exporters = []
    if push is not None:
        exporters.append(control_pb2.Exporter(Type="image", Attrs={"name": push, "push": "true"}))
    request = control_pb2.SolveRequest(
        Ref=secrets.token_hex(12),
        Definition=definition,
        Session=session.id,
        Exporters=exporters,
    )
    async with asyncio.timeout(SOLVE_TIMEOUT_S), session.attach(control):
        solving = asyncio.ensure_future(control.Solve(request))
        broken = asyncio.ensure_future(session.failed.wait())
        done, _ = await asyncio.wait({solving, broken}, return_when="FIRST_COMPLETED")
        broken.cancel()
        if solving not in done:
            solving.cancel()
            raise AssertionError(f"session broke during the solve: {session.error}")
        response = solving.result()
    assert not session.failed.is_set(), session.error
    return dict(response.ExporterResponse)


def _registry_get(registry: Registry, path: str, accept: str | None = None) -> bytes:
    request = urllib.request.Request(f"http://{registry.host}{path}")
    token = base64.b64encode(f"{registry.username}:{registry.password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    if accept:
        request.add_header("Accept", accept)
    with urllib.request.urlopen(request, timeout=30) as response:
        data: bytes = response.read()
        return data


@dataclasses.dataclass(frozen=True)
class LayerEntry:
    info: tarfile.TarInfo
    data: bytes | None


Layer = dict[str, LayerEntry]


def pushed_layers(registry: Registry, repository: str, tag: str) -> list[Layer]:
    """Every layer of a pushed single-platform image: path -> header and content."""
    _, raw = registry.manifest(repository, tag)
    manifest = json.loads(raw)
    layers = []
    for layer in manifest["layers"]:
        blob = _registry_get(registry, f"/v2/{repository}/blobs/{layer['digest']}")
        assert hashlib.sha256(blob).hexdigest() == layer["digest"].removeprefix("sha256:")
        if layer["mediaType"].endswith("gzip"):
            blob = gzip.decompress(blob)
        entries: Layer = {}
        with tarfile.open(fileobj=io.BytesIO(blob)) as archive:
            for info in archive.getmembers():
                extracted = archive.extractfile(info) if info.isfile() else None
                data = extracted.read() if extracted is not None else None
                entries[info.name.rstrip("/")] = LayerEntry(info, data)
        layers.append(entries)
    return layers


def tree(root: Path) -> set[str]:
    """Every path below root, relative, as a layer lists them."""
    return {
        os.path.relpath(os.path.join(d, n), root)
        for d, dirs, files in os.walk(root)
        for n in dirs + files
    }


def credentials_for(registry: Registry) -> Credentials:
    token = base64.b64encode(f"{registry.username}:{registry.password}".encode()).decode()
    return Credentials.from_json(json.dumps({"auths": {registry.host: {"auth": token}}}))


# --- the tests -------------------------------------------------------------------------


ODD_NAMES = ["with space", "tab\there", "new\nline", "ünïcødé", "日本語", "#hash%25", "-dash"]
MTIME_NS = 1_500_000_000_987_654_321
NON_UTF8_NAME = b"caf\xe9.txt"


@pytest.fixture
def odd_context(tmp_path: Path) -> Path:
    root = tmp_path / "context"
    (root / "a").mkdir(parents=True)
    (root / "a" / "b").write_bytes(b"ab\n")
    (root / "a-b").write_bytes(b"a-b\n")
    (root / "empty" / "deeper").mkdir(parents=True)
    (root / "run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o755)
    (root / "private.txt").write_bytes(b"private\n")
    (root / "private.txt").chmod(0o600)
    # No setuid file: the rootless daemon drops setuid even for buildctl's uploads
    # (checked with buildctl against the same test-bed daemon); the mode mapping
    # is covered by tests/unit/test_filesync.py.
    (root / "sticky").mkdir()
    (root / "sticky").chmod(0o1777)
    (root / "link").symlink_to("a/b")
    (root / "dangling").symlink_to("../nowhere")
    (root / "hard1").write_bytes(b"shared inode\n")
    os.link(root / "hard1", root / "hard2")
    (root / "big.bin").write_bytes(os.urandom(20 * 1024 * 1024 + 3))
    for name in ODD_NAMES:
        (root / name).write_bytes(name.encode() + b"\n")
    # Not UTF-8: sent as raw bytes, as the Go client does.
    with open(os.path.join(os.fsencode(root), NON_UTF8_NAME), "wb") as f:
        f.write(b"latin-1\n")
    os.utime(root / "a" / "b", ns=(MTIME_NS, MTIME_NS))
    return root


async def test_local_context_arrives_intact(
    control: control_pb2_grpc.ControlStub, registry: Registry, odd_context: Path
) -> None:
    graph = Graph()
    context = local_source(graph, "context")
    tag = secrets.token_hex(6)
    session = Session(
        credentials=credentials_for(registry),
        local_dirs={"context": odd_context},
        shared_key=secrets.token_hex(8),
    )
    response = await solve(
        control, session, graph.definition(context), push=registry.ref("session/odd", tag)
    )
    assert response["containerimage.digest"].startswith("sha256:")

    (layer,) = pushed_layers(registry, "session/odd", tag)
    got = {name: entry.info for name, entry in layer.items()}
    for name in ODD_NAMES:
        assert got[name].isfile()
        assert layer[name].data == name.encode() + b"\n"
    assert layer[os.fsdecode(NON_UTF8_NAME)].data == b"latin-1\n"
    big = layer["big.bin"].data
    assert big is not None
    expected_big = hashlib.sha256((odd_context / "big.bin").read_bytes()).hexdigest()
    assert hashlib.sha256(big).hexdigest() == expected_big
    assert got["run.sh"].mode == 0o755
    assert got["private.txt"].mode == 0o600
    assert got["sticky"].isdir()
    assert got["sticky"].mode == 0o1777
    assert got["empty/deeper"].isdir()
    assert got["link"].issym()
    assert got["link"].linkname == "a/b"
    assert got["dangling"].linkname == "../nowhere"
    assert got["hard2"].islnk() or got["hard1"].islnk()
    assert int(got["a/b"].mtime) == MTIME_NS // 1_000_000_000
    assert {(m.uid, m.gid) for m in got.values()} == {(0, 0)}
    assert set(got) == tree(odd_context)


async def test_include_and_exclude_patterns(
    control: control_pb2_grpc.ControlStub, registry: Registry, tmp_path: Path
) -> None:
    root = tmp_path / "patterns"
    for rel in [
        "src/app.py",
        "src/app.pyc",
        "src/lib/util.py",
        "node_modules/dep/index.js",
        "node_modules/keep/keep.js",
        "docs/readme.md",
        "build.log",
        "important.log",
        "Dockerfile",
    ]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(rel)
    graph = Graph()
    excludes = ["node_modules", "!node_modules/keep", "*.log", "!important.log", "**/*.pyc"]
    context = local_source(
        graph,
        "context",
        {
            "local.includepattern": json.dumps(["src", "node_modules", "*.log"]),
            "local.excludepatterns": json.dumps(excludes),
        },
    )
    tag = secrets.token_hex(6)
    session = Session(credentials=credentials_for(registry), local_dirs={"context": root})
    await solve(control, session, graph.definition(context), push=registry.ref("session/pat", tag))
    (layer,) = pushed_layers(registry, "session/pat", tag)
    assert sorted(layer) == [
        "important.log",
        "node_modules",
        "node_modules/keep",
        "node_modules/keep/keep.js",
        "src",
        "src/app.py",
        "src/lib",
        "src/lib/util.py",
    ]


async def test_secret_mount_readable_in_run(
    control: control_pb2_grpc.ControlStub, registry: Registry, base_image: str
) -> None:
    value = secrets.token_bytes(48)
    graph = Graph()
    base = image_source(graph, base_image)
    secret_mount = ops_pb2.Mount(
        input=-1,
        dest="/run/secrets/token",
        output=-1,
        mountType=ops_pb2.SECRET,
        secretOpt=ops_pb2.SecretOpt(ID="token", mode=0o400),
    )
    step = run(graph, base, "sha256sum /run/secrets/token > /secret.sum", mounts=[secret_mount])
    tag = secrets.token_hex(6)
    session = Session(credentials=credentials_for(registry), secrets={"token": value})
    await solve(control, session, graph.definition(step), push=registry.ref("session/secret", tag))
    layers = pushed_layers(registry, "session/secret", tag)
    summed = layers[-1]["secret.sum"].data
    assert summed is not None
    assert summed.split()[0].decode() == hashlib.sha256(value).hexdigest()
    # The mount is not part of the image.
    assert all("run/secrets/token" not in path for layer in layers for path in layer)


async def test_unknown_secret_fails_the_step(
    control: control_pb2_grpc.ControlStub, registry: Registry, base_image: str
) -> None:
    graph = Graph()
    base = image_source(graph, base_image)
    secret_mount = ops_pb2.Mount(
        input=-1,
        dest="/run/secrets/missing",
        output=-1,
        mountType=ops_pb2.SECRET,
        secretOpt=ops_pb2.SecretOpt(ID="missing", mode=0o400),
    )
    step = run(graph, base, "cat /run/secrets/missing", mounts=[secret_mount])
    session = Session(credentials=credentials_for(registry), secrets={"other": b"x"})
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await solve(control, session, graph.definition(step))
    assert "missing" in (info.value.details() or "")
    assert "not found" in (info.value.details() or "")


async def test_push_needs_the_session_credentials(
    control: control_pb2_grpc.ControlStub,
    registry: Registry,
    registry_docker_config: Path,
    tmp_path: Path,
) -> None:
    (tmp_path / "ctx").mkdir()
    (tmp_path / "ctx" / "f").write_text(secrets.token_hex(8))
    graph = Graph()
    definition = graph.definition(local_source(graph, "context"))
    tag = secrets.token_hex(6)
    anonymous = Session(local_dirs={"context": tmp_path / "ctx"})
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await solve(control, anonymous, definition, push=registry.ref("session/auth", tag))
    assert "401" in (info.value.details() or "")
    assert not registry.tag_exists("session/auth", tag)

    # The client-side docker config the test bed writes, found via DOCKER_CONFIG.
    from_config = Credentials.from_environment({"DOCKER_CONFIG": str(registry_docker_config)})
    authorized = Session(credentials=from_config, local_dirs={"context": tmp_path / "ctx"})
    response = await solve(control, authorized, definition, push=registry.ref("session/auth", tag))
    assert response["containerimage.digest"] == registry.manifest_digest("session/auth", tag)


@pytest.fixture
def doomed_buildkitd(registry: Registry) -> Iterator[BuildKit]:
    """A private daemon this test may kill (never the shared one)."""
    kit = start_buildkitd(insecure_registries=[registry.host])
    try:
        yield kit
    finally:
        kit.stop()


async def test_daemon_killed_mid_solve_ends_with_a_clear_error(
    doomed_buildkitd: BuildKit, registry: Registry, base_image: str, tmp_path: Path
) -> None:
    (tmp_path / "ctx").mkdir()
    (tmp_path / "ctx" / "f").write_text("x")
    graph = Graph()
    base = image_source(graph, base_image)
    step = run(graph, base, f"sleep 60 # {secrets.token_hex(4)}")
    request = control_pb2.SolveRequest(Ref=secrets.token_hex(12), Definition=graph.definition(step))
    channel = grpc.aio.insecure_channel(doomed_buildkitd.address.replace("unix://", "unix:", 1))
    control = control_pb2_grpc.ControlStub(channel)  # type: ignore[no-untyped-call]
    session = Session(credentials=credentials_for(registry))
    request.Session = session.id
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(60), session.attach(control):
            solving = asyncio.ensure_future(control.Solve(request))
            # Let the pull finish and the RUN start, then kill the daemon outright.
            await asyncio.sleep(3)
            assert not solving.done(), solving
            os.kill(doomed_buildkitd.pid, signal.SIGKILL)
            killed_at = loop.time()
            await session.failed.wait()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await solving
        assert loop.time() - killed_at < 15
    finally:
        await channel.close(None)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert isinstance(session.error, SessionError)
    assert "session tunnel to buildkitd broke: UNAVAILABLE" in str(session.error)


def _upload_summaries(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("local ")]


async def test_second_upload_sends_only_changes(
    control: control_pb2_grpc.ControlStub,
    registry: Registry,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="build_runner.buildkit.sync")
    root = tmp_path / "incremental"
    root.mkdir()
    for i in range(20):
        (root / f"same{i:02}.txt").write_text(f"unchanged {i}\n")
    (root / "changes.txt").write_text("old\n")
    (root / "goes-away.txt").write_text("bye\n")
    shared_key, hint, unique = secrets.token_hex(8), secrets.token_hex(4), secrets.token_hex(4)

    async def upload(tag: str) -> Layer:
        graph = Graph()
        # Same op bytes, shared key and hint each time: the daemon diffs against
        # its snapshot of the previous upload and asks only for what changed.
        source = ops_pb2.SourceOp(
            identifier="local://context",
            attrs={"local.sharedkeyhint": hint, "local.unique": unique},
        )
        local = graph.add(ops_pb2.Op(source=source), "local context")
        # Exported through a copy, as a real build does: an image holding the
        # local snapshot itself would pin it and force a full upload next time.
        definition = graph.definition(copy_into_scratch(graph, local))
        session = Session(
            credentials=credentials_for(registry),
            local_dirs={"context": root},
            shared_key=shared_key,
        )
        await solve(control, session, definition, push=registry.ref("session/incr", tag))
        (layer,) = pushed_layers(registry, "session/incr", tag)
        return layer

    first = await upload("one")
    assert first["changes.txt"].data == b"old\n"
    (root / "changes.txt").write_text("new content\n")
    os.utime(root / "changes.txt", ns=(MTIME_NS, MTIME_NS))
    (root / "goes-away.txt").unlink()
    (root / "added.txt").write_text("added\n")
    second = await upload("two")

    assert second["changes.txt"].data == b"new content\n"
    assert second["added.txt"].data == b"added\n"
    assert "goes-away.txt" not in second
    assert second["same07.txt"].data == b"unchanged 7\n"
    summaries = _upload_summaries(caplog)
    assert summaries[0] == "local 'context' sent: 22 entries, 22 files requested, " + (
        f"{sum(len(e.data or b'') for e in first.values())} bytes"
    )
    assert summaries[1].startswith("local 'context' sent: 22 entries, 2 files requested, ")


async def test_follow_paths(
    control: control_pb2_grpc.ControlStub, registry: Registry, tmp_path: Path
) -> None:
    root = tmp_path / "follow"
    (root / "real" / "sub").mkdir(parents=True)
    (root / "real" / "sub" / "wanted.txt").write_text("wanted\n")
    (root / "real" / "other.txt").write_text("other\n")
    (root / "unrelated.txt").write_text("unrelated\n")
    (root / "alias").symlink_to("real")
    graph = Graph()
    context = local_source(
        graph, "context", {"local.followpaths": json.dumps(["alias/sub/wanted.txt"])}
    )
    tag = secrets.token_hex(6)
    session = Session(credentials=credentials_for(registry), local_dirs={"context": root})
    await solve(control, session, graph.definition(context), push=registry.ref("session/fp", tag))
    (layer,) = pushed_layers(registry, "session/fp", tag)
    assert sorted(layer) == ["alias", "real", "real/sub", "real/sub/wanted.txt"]
    assert layer["alias"].info.linkname == "real"


@pytest.mark.slow
async def test_session_survives_health_checks_through_a_long_step(
    control: control_pb2_grpc.ControlStub, registry: Registry, base_image: str
) -> None:
    # The daemon checks health every 5 s and drops the session after two
    # failures; the push after the step needs the session's credentials, so it
    # only succeeds if the session lived through three rounds of checks.
    graph = Graph()
    step = run(graph, image_source(graph, base_image), f"sleep 16; echo {secrets.token_hex(4)}")
    tag = secrets.token_hex(6)
    # A tight silence limit also proves the daemon's checks reach our servicer.
    session = Session(credentials=credentials_for(registry), health_silence_s=12)
    response = await solve(control, session, graph.definition(step), push=registry.ref("s/h", tag))
    assert response["containerimage.digest"] == registry.manifest_digest("s/h", tag)
