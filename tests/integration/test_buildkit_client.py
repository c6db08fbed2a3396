"""BuildkitClient against the real rootless buildkitd of the test bed.

Without a session the daemon cannot pull from the authenticating test registry, so
most tests assemble their root filesystem in LLB: Debian's static busybox is downloaded by
the daemon itself (an `http://` source) from a file server on loopback, then
copied into scratch with file ops.
"""

from __future__ import annotations

import asyncio
import http.server
import os
import platform
import secrets
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from build_runner import llb
from build_runner._pb.buildkit import control_pb2
from build_runner.buildkit.auth import Credentials
from build_runner.buildkit.client import BuildkitClient, ConnectOptions
from build_runner.buildkit.errors import (
    BuildkitUnavailableError,
    SessionError,
    SolveCancelledError,
    SolveError,
)
from build_runner.buildkit.exports import Exporter, HistoryEntry, ImageConfig, ImageExport
from build_runner.buildkit.progress import PlainProgress
from build_runner.buildkit.session import Session
from tests.testbed.buildkit import BuildKit, start_buildkitd
from tests.testbed.process import free_port

pytestmark = pytest.mark.buildkit

BUSYBOX = Path("/bin/busybox")
EXPECTED_VERSION = "v0.32.2"
GO_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        return


@pytest.fixture(scope="module")
def busybox_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Debian's static busybox served over HTTP on loopback for the daemon to fetch."""
    if not BUSYBOX.is_file():
        pytest.fail(f"{BUSYBOX} missing: install Debian's busybox-static (install-testbed.sh)")
    root = tmp_path_factory.mktemp("www")
    (root / "busybox").write_bytes(BUSYBOX.read_bytes())

    def handler(*args: object, **kwargs: object) -> _Quiet:
        return _Quiet(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/busybox"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture(scope="module")
async def client(buildkitd: BuildKit) -> AsyncIterator[BuildkitClient]:
    async with BuildkitClient(ConnectOptions(address=buildkitd.address)) as c:
        yield c


def rootfs(busybox_url: str) -> llb.State:
    """A minimal root filesystem: /bin/busybox plus the applets the tests call."""
    busybox = llb.http(busybox_url, filename="busybox", perm=0o755, name="fetch busybox")
    chain = llb.mkdir("/bin").then(llb.copy(busybox, "/busybox", "/bin/busybox"))
    for applet in ("sh", "sleep", "cat", "echo"):
        chain = chain.then(llb.symlink("busybox", f"/bin/{applet}"))
    return llb.scratch().file(chain, name="assemble rootfs").add_env("PATH", "/bin")


def sleeping_pids(marker: str) -> list[int]:
    """Pids whose command line contains `marker` (build steps are host processes)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmdline and "sleep" in cmdline:
            pids.append(int(entry.name))
    return pids


async def test_info_and_default_platform(client: BuildkitClient) -> None:
    version = await client.info()
    assert version.version == EXPECTED_VERSION
    assert version.package == "github.com/moby/buildkit"
    default = await client.default_platform()
    assert default.os == "linux"
    assert default.architecture == GO_ARCH.get(platform.machine(), platform.machine())


async def test_tcp_address(buildkitd: BuildKit) -> None:
    async with BuildkitClient(ConnectOptions(address=buildkitd.tcp_address)) as c:
        assert (await c.info()).version == EXPECTED_VERSION


async def test_solve_renders_progress_and_exports_image(
    client: BuildkitClient, busybox_url: str
) -> None:
    token = secrets.token_hex(8)
    plat = await client.default_platform()
    st = rootfs(busybox_url).file(llb.mkfile("/token", 0o644, token.encode()), name="token")
    st = st.run("cat /token; echo; echo to-stderr >&2", name="print token")
    definition = llb.marshal(st, platform=plat)
    progress = PlainProgress()
    lines: list[str] = []
    daemon_digests: set[str] = set()

    def on_progress(message: control_pb2.StatusResponse) -> None:
        daemon_digests.update(v.digest for v in message.vertexes)
        lines.extend(progress.feed(message))

    config = ImageConfig(os=plat.os, architecture=plat.architecture, env=["PATH=/bin"])
    result = await client.solve(
        definition, exports=[ImageExport(names=[], config=config)], on_progress=on_progress
    )

    numbers = {line.split(" ", 1)[1]: line.split(" ", 1)[0] for line in lines if " " in line}
    run_logs = [line for line in lines if line.startswith(numbers["print token"] + " ")]
    assert any(line.endswith(f" {token}") for line in run_logs), lines
    assert any(line.endswith(" to-stderr") for line in run_logs), lines
    assert any(" DONE " in line for line in run_logs), lines
    assert not [line for line in lines if " ERROR" in line]
    # Our Go-order serialization gives the daemon's own digests (terminal op excluded).
    ours = set(definition.metadata) - {llb.op_digest(getattr(definition, "def")[-1])}
    assert ours <= daemon_digests, sorted(ours - daemon_digests)

    assert result.image_digest is not None
    assert result.image_digest.startswith("sha256:")
    assert result.config_digest is not None
    descriptor = result.descriptor
    assert descriptor is not None
    assert descriptor.digest == result.image_digest
    assert descriptor.media_type == OCI_MANIFEST
    assert descriptor.platform == {"architecture": plat.architecture, "os": plat.os}


async def test_explicit_history_makes_image_digest_reproducible(
    client: BuildkitClient, busybox_url: str
) -> None:
    plat = await client.default_platform()
    definition = llb.marshal(rootfs(busybox_url), platform=plat)

    def export(created: str) -> ImageExport:
        history = [HistoryEntry(created_by="assemble rootfs", created=created)]
        cfg = ImageConfig(
            os=plat.os,
            architecture=plat.architecture,
            cmd=["/bin/sh"],
            history=history,
            created=created,
        )
        return ImageExport(names=[], config=cfg)

    first = await client.solve(definition, exports=[export("2026-01-01T00:00:00Z")])
    again = await client.solve(definition, exports=[export("2026-01-01T00:00:00Z")])
    later = await client.solve(definition, exports=[export("2026-06-01T00:00:00Z")])
    assert first.image_digest is not None
    assert first.image_digest == again.image_digest
    assert later.image_digest != first.image_digest


async def test_failing_run_raises_solve_error_with_exit_code(
    client: BuildkitClient, busybox_url: str
) -> None:
    plat = await client.default_platform()
    st = rootfs(busybox_url).run("echo about to fail; exit 7", name="fail on purpose")
    progress = PlainProgress()
    lines: list[str] = []
    with pytest.raises(SolveError) as caught:
        await client.solve(
            llb.marshal(st, platform=plat), on_progress=lambda m: lines.extend(progress.feed(m))
        )
    assert not isinstance(caught.value, SolveCancelledError)
    assert "exit code: 7" in str(caught.value)
    assert caught.value.code is not None
    assert any("ERROR:" in line and "exit code: 7" in line for line in lines), lines
    assert [v.name for v in progress.failed()] == ["fail on purpose"]
    assert "about to fail" in progress.failed()[0].log_tail


async def test_early_solve_failure_does_not_wait_for_status(
    client: BuildkitClient, busybox_url: str
) -> None:
    definition = llb.marshal(rootfs(busybox_url))
    started = time.monotonic()
    with pytest.raises(SolveError, match="could not be found"):
        await client.solve(definition, exports=[Exporter("no-such-exporter")])
    # A Status stream for a job that never registers would hold us ~6 s.
    assert time.monotonic() - started < 3.0


async def test_cancelling_the_call_stops_the_build_on_the_daemon(
    client: BuildkitClient, busybox_url: str
) -> None:
    marker = f"{secrets.randbelow(10**6)}.{secrets.randbelow(1000):03d}"
    plat = await client.default_platform()
    st = rootfs(busybox_url).run(f"sleep {marker}", name="sleep forever")
    task = asyncio.create_task(client.solve(llb.marshal(st, platform=plat)))
    deadline = time.monotonic() + 60
    while not sleeping_pids(marker):
        assert not task.done(), task
        assert time.monotonic() < deadline, "the sleep step never started"
        await asyncio.sleep(0.1)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    cancelled_at = time.monotonic()
    while sleeping_pids(marker):
        assert time.monotonic() - cancelled_at < 15, "daemon kept running the cancelled step"
        await asyncio.sleep(0.1)
    # The daemon is still healthy and serves the next call.
    assert (await client.info()).version == EXPECTED_VERSION


async def test_unreachable_daemon_fails_fast() -> None:
    for address in ("unix:///nonexistent/buildkitd.sock", f"tcp://127.0.0.1:{free_port()}"):
        started = time.monotonic()
        with pytest.raises(BuildkitUnavailableError, match="not ready after 1s"):
            async with BuildkitClient(ConnectOptions(address=address, ready_timeout_s=1.0)):
                pass
        assert time.monotonic() - started < 5.0


async def test_killed_daemon_ends_solve_with_unavailable(busybox_url: str) -> None:
    """Uses its own daemon: killing the shared one would break every later test."""
    marker = f"{secrets.randbelow(10**6)}.{secrets.randbelow(1000):03d}"
    kit = start_buildkitd()
    try:
        async with BuildkitClient(ConnectOptions(address=kit.address)) as c:
            plat = await c.default_platform()
            # Prune on this private daemon: something built -> records freed, then none.
            await c.solve(llb.marshal(rootfs(busybox_url), platform=plat))
            pruned = await c.prune(all=True)
            assert pruned.records > 0
            assert pruned.bytes_freed > 0
            assert (await c.prune(all=True)).records == 0

            st = rootfs(busybox_url).run(f"sleep {marker}", name="sleep")
            task = asyncio.create_task(c.solve(llb.marshal(st, platform=plat)))
            deadline = time.monotonic() + 60
            while not sleeping_pids(marker):
                assert not task.done(), task
                assert time.monotonic() < deadline, "the sleep step never started"
                await asyncio.sleep(0.1)
            os.kill(kit.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            with pytest.raises(BuildkitUnavailableError):
                await task
            assert time.monotonic() - killed_at < 5.0
            with pytest.raises(BuildkitUnavailableError):
                await c.info()
    finally:
        kit.stop()
        # A killed daemon can't reap its step; don't leave the sleep behind.
        for pid in sleeping_pids(marker):
            os.kill(pid, signal.SIGKILL)


async def test_session_credentials_pull_base_image(
    client: BuildkitClient, base_image: str, registry_docker_config: Path
) -> None:
    """solve(session=...) attaches the session and routes the pull's 401 through it."""
    plat = await client.default_platform()
    token = secrets.token_hex(8)
    st = llb.image(base_image, platform=plat, name="base").run(
        ["/bin/sh", "-c", f"echo {token}"], name="echo"
    )
    definition = llb.marshal(st, platform=plat)
    lines: list[str] = []
    progress = PlainProgress()
    daemon_digests: set[str] = set()

    def on_progress(message: control_pb2.StatusResponse) -> None:
        daemon_digests.update(v.digest for v in message.vertexes)
        lines.extend(progress.feed(message))

    session = Session(credentials=Credentials.from_docker_config_dir(registry_docker_config))
    await client.solve(definition, session=session, on_progress=on_progress)
    assert any(line.endswith(f" {token}") for line in lines), lines
    # An image source with a platform keeps the daemon's digest too.
    ours = set(definition.metadata) - {llb.op_digest(getattr(definition, "def")[-1])}
    assert ours <= daemon_digests, sorted(ours - daemon_digests)
    # Without credentials the same pull is refused by the registry.
    with pytest.raises(SolveError, match="401"):
        await client.solve(
            llb.marshal(llb.image(base_image, platform=plat).run("true", ignore_cache=True)),
            session=Session(),
        )


async def test_one_attached_session_serves_several_solves(
    client: BuildkitClient, base_image: str, registry_docker_config: Path
) -> None:
    plat = await client.default_platform()
    session = Session(credentials=Credentials.from_docker_config_dir(registry_docker_config))
    async with client.attach(session):
        for i in range(2):
            st = llb.image(base_image, platform=plat).run(f"echo {i}", ignore_cache=True)
            await client.solve(llb.marshal(st, platform=plat), session=session)
        assert not session.failed.is_set()
        with pytest.raises(SessionError, match="already attached"):
            async with client.attach(session):
                pass


async def test_session_failure_fails_the_solve_and_stops_the_build(
    client: BuildkitClient, base_image: str, registry_docker_config: Path
) -> None:
    """A session that reports failure mid-build ends the solve with its SessionError.

    The failure is raised through the session's public signal (`error` + `failed`),
    the same one its tunnel watcher sets; breaking the real tunnel from outside is
    the session's own tests' business.
    """
    plat = await client.default_platform()
    marker = f"{secrets.randbelow(10**6)}.{secrets.randbelow(1000):03d}"
    session = Session(credentials=Credentials.from_docker_config_dir(registry_docker_config))
    st = llb.image(base_image, platform=plat).run(f"sleep {marker}", name="sleep")
    task = asyncio.create_task(client.solve(llb.marshal(st, platform=plat), session=session))
    deadline = time.monotonic() + 60
    while not sleeping_pids(marker):
        assert not task.done(), task
        assert time.monotonic() < deadline, "the sleep step never started"
        await asyncio.sleep(0.1)

    session.error = SessionError("tunnel closed under test")
    session.failed.set()
    with pytest.raises(SessionError, match="tunnel closed under test"):
        await task
    failed_at = time.monotonic()
    while sleeping_pids(marker):
        assert time.monotonic() - failed_at < 15, "daemon kept running after the session failed"
        await asyncio.sleep(0.1)
