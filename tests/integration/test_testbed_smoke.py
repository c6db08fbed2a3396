"""Smoke tests of the BuildKit test bed itself, driven by buildctl.

They prove the claims the rest of the suite relies on: the registry really
authenticates, credentials reach buildkitd only through the client's session, the
daemon holds none of its own, and it runs unprivileged with no process sandbox.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.testbed.buildkit import (
    BuildKit,
    dockerfile_build_args,
    read_image_digest,
    start_buildkitd,
)
from tests.testbed.process import REPO, DaemonError
from tests.testbed.registry import Registry, start_registry

pytestmark = pytest.mark.buildkit

# Files this large under the daemon's state are layer blobs of other tests' images at
# most; the scan is for small config or credential files.
SCAN_LIMIT_BYTES = 8 * 1024 * 1024


def _scratch_context(directory: Path) -> str:
    """A context whose single layer is unique to this run, so nothing is cached remotely."""
    directory.mkdir(parents=True, exist_ok=True)
    payload = secrets.token_hex(16)
    (directory / "payload.txt").write_text(payload + "\n")
    (directory / "Dockerfile").write_text("FROM scratch\nCOPY payload.txt /payload.txt\n")
    return payload


def test_push_without_client_credentials_is_refused(
    buildkitd: BuildKit, registry: Registry, empty_docker_config: Path, tmp_path: Path
) -> None:
    _scratch_context(tmp_path / "ctx")
    ref = registry.ref("smoke/no-creds", "v1")

    result = buildkitd.buildctl(
        *dockerfile_build_args(tmp_path / "ctx", "--output", f"type=image,name={ref},push=true"),
        docker_config=empty_docker_config,
        check=False,
    )

    assert result.returncode != 0, result.stderr
    assert "401 Unauthorized" in result.stderr
    assert f"failed to push {ref}" in result.stderr
    assert not registry.tag_exists("smoke/no-creds", "v1")


def test_push_with_client_credentials_only_succeeds(
    buildkitd: BuildKit, registry: Registry, registry_docker_config: Path, tmp_path: Path
) -> None:
    _scratch_context(tmp_path / "ctx")
    ref = registry.ref("smoke/with-creds", "v1")
    metadata = tmp_path / "metadata.json"
    # The daemon's own DOCKER_CONFIG is empty, so these can only come from the session.
    assert list(buildkitd.docker_config.iterdir()) == []

    buildkitd.buildctl(
        *dockerfile_build_args(
            tmp_path / "ctx",
            "--output",
            f"type=image,name={ref},push=true",
            "--metadata-file",
            str(metadata),
        ),
        docker_config=registry_docker_config,
    )

    reported = read_image_digest(metadata)
    assert registry.tag_exists("smoke/with-creds", "v1")
    assert registry.manifest_digest("smoke/with-creds", "v1") == reported
    assert registry.status(f"/v2/smoke/with-creds/manifests/{reported}", auth=False) == 401


def test_daemon_holds_no_registry_credentials(
    buildkitd: BuildKit, registry: Registry, registry_docker_config: Path, tmp_path: Path
) -> None:
    # Push once first, so a daemon that cached session credentials would have them now.
    _scratch_context(tmp_path / "ctx")
    buildkitd.buildctl(
        *dockerfile_build_args(
            tmp_path / "ctx",
            "--output",
            f"type=image,name={registry.ref('smoke/scan', 'v1')},push=true",
        ),
        docker_config=registry_docker_config,
    )
    secrets_to_find = [
        registry.password.encode(),
        base64.b64encode(f"{registry.username}:{registry.password}".encode()),
    ]

    environ = Path(f"/proc/{buildkitd.pid}/environ").read_bytes().split(b"\0")
    env = dict(item.split(b"=", 1) for item in environ if b"=" in item)
    assert env[b"DOCKER_CONFIG"] == str(buildkitd.docker_config).encode()
    assert list(buildkitd.docker_config.iterdir()) == []
    for value in env.values():
        for secret in secrets_to_find:
            assert secret not in value

    scanned = 0
    for path in [*buildkitd.state_dir.rglob("*"), buildkitd.log_path]:
        if path.is_symlink() or not path.is_file() or path.parent.name == "bin":
            continue
        if path.stat().st_size > SCAN_LIMIT_BYTES:
            continue
        data = path.read_bytes()
        scanned += 1
        for secret in secrets_to_find:
            assert secret not in data, f"registry credential found in {path}"
    assert scanned > 10  # the scan really read the daemon's state, not an empty dir


def test_daemon_runs_unprivileged_without_process_sandbox(buildkitd: BuildKit) -> None:
    expected_uid = pwd.getpwnam(buildkitd.user).pw_uid if os.geteuid() == 0 else os.geteuid()
    status = Path(f"/proc/{buildkitd.pid}/status").read_text()
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    gid_line = next(line for line in status.splitlines() if line.startswith("Gid:"))
    # Real, effective, saved and filesystem ids, as the host sees them.
    assert {int(v) for v in uid_line.split()[1:]} == {expected_uid}
    assert expected_uid != 0
    assert 0 not in {int(v) for v in gid_line.split()[1:]}

    cmdline = Path(f"/proc/{buildkitd.pid}/cmdline").read_bytes().split(b"\0")
    assert b"--oci-worker-no-process-sandbox" in cmdline
    # Rootless means its own user namespace, in which it is mapped from the unprivileged id.
    assert os.readlink(f"/proc/{buildkitd.pid}/ns/user") != os.readlink("/proc/self/ns/user")
    uid_map = Path(f"/proc/{buildkitd.pid}/uid_map").read_text().split()
    assert uid_map[:3] == ["0", str(expected_uid), "1"]

    workers = buildkitd.buildctl("debug", "workers", "--verbose").stdout
    assert "org.mobyproject.buildkit.worker.oci.process-mode:\tno-sandbox" in workers


def test_base_image_runs_build_steps(
    buildkitd: BuildKit, base_image: str, registry_docker_config: Path, tmp_path: Path
) -> None:
    context = tmp_path / "ctx"
    payload = _scratch_context(context)
    (context / "Dockerfile").write_text(
        f"FROM {base_image}\n"
        "COPY payload.txt /in/payload.txt\n"
        "RUN mkdir /out && id -u > /out/uid\n"
        "RUN sha256sum /in/payload.txt | cut -d' ' -f1 > /out/sum\n"
        "USER 10001\n"
        "RUN id -u > /tmp/uid-after-user\n"
        "FROM scratch\n"
        "COPY --from=0 /out/ /\n"
        "COPY --from=0 /tmp/uid-after-user /\n"
    )
    dest = tmp_path / "export"

    buildkitd.buildctl(
        *dockerfile_build_args(context, "--output", f"type=local,dest={dest}"),
        docker_config=registry_docker_config,
    )

    assert (dest / "sum").read_text().strip() == hashlib.sha256(f"{payload}\n".encode()).hexdigest()
    assert (dest / "uid").read_text().strip() == "0"
    assert (dest / "uid-after-user").read_text().strip() == "10001"


def test_base_image_is_pullable_only_with_credentials(registry: Registry, base_image: str) -> None:
    repository, tag = base_image.split("/", 1)[1].rsplit(":", 1)
    media_type, body = registry.manifest(repository, tag)
    assert media_type == "application/vnd.oci.image.manifest.v1+json"
    assert json.loads(body)["layers"]
    assert registry.status(f"/v2/{repository}/manifests/{tag}", auth=False) == 401


def test_unstartable_buildkitd_fails_loudly(tmp_path: Path) -> None:
    log = tmp_path / "bad.log"
    # Its own parent dir (traversable by the daemon's user, unlike pytest's tmp_path), so
    # the cleanup check is not disturbed by other test sessions on the machine.
    state_parent = Path(tempfile.mkdtemp(prefix="lucity-smoke-"))
    state_parent.chmod(0o755)
    started = time.monotonic()
    try:
        with pytest.raises(DaemonError) as excinfo:
            start_buildkitd(extra_args=["--no-such-flag"], log_path=log, state_parent=state_parent)

        message = str(excinfo.value)
        assert "buildkitd exited" in message
        assert "flag provided but not defined: -no-such-flag" in message
        assert time.monotonic() - started < 20
        # A failed start cleans up after itself.
        assert list(state_parent.iterdir()) == []
    finally:
        shutil.rmtree(state_parent)


def test_unstartable_registry_fails_loudly(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        with pytest.raises(DaemonError) as excinfo:
            start_registry(tmp_path / "registry", port=port)

    message = str(excinfo.value)
    assert "docker-registry exited" in message
    assert "address already in use" in message


def _step_processes(marker: bytes) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                cmdline = (entry / "cmdline").read_bytes()
                if marker in cmdline and (entry / "stat").read_text().split()[2] != "Z":
                    found[int(entry.name)] = cmdline
    return found


def test_stop_leaves_no_build_step_processes(
    registry: Registry, base_image: str, registry_docker_config: Path, tmp_path: Path
) -> None:
    """Without a process sandbox a step's processes outlive buildkitd unless stop() kills them."""
    kit = start_buildkitd(insecure_registries=[registry.host], log_path=tmp_path / "bk.log")
    # A per-test sleep length marks this test's processes among everything on the host.
    marker = str(100000 + secrets.randbelow(800000))
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Dockerfile").write_text(f"FROM {base_image}\nRUN sleep {marker} & sleep {marker}\n")
    build = subprocess.Popen(
        [str(kit.buildctl_path), "--addr", kit.address, *dockerfile_build_args(context)],
        env={"DOCKER_CONFIG": str(registry_docker_config)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while len(_step_processes(f"sleep\0{marker}".encode())) < 2:
            assert build.poll() is None, "the build ended before its step started"
            assert time.monotonic() < deadline, "the build step never started"
            time.sleep(0.1)
        steps = _step_processes(f"sleep\0{marker}".encode())
        # They run as the daemon's unprivileged user, like the daemon itself.
        for pid in steps:
            assert Path(f"/proc/{pid}").stat().st_uid == pwd.getpwnam(kit.user).pw_uid
    finally:
        kit.stop()
        build.wait(timeout=30)

    assert _step_processes(f"sleep\0{marker}".encode()) == {}
    assert build.returncode != 0
    assert not kit.state_dir.exists()


def test_public_registry_names_are_served_by_the_test_registry(
    buildkitd: BuildKit,
    registry: Registry,
    base_image: str,
    registry_docker_config: Path,
    empty_docker_config: Path,
    tmp_path: Path,
) -> None:
    # Put a copy of the base image where a plan naming ghcr.io would look for it.
    stand_in = tmp_path / "stand-in"
    stand_in.mkdir()
    (stand_in / "Dockerfile").write_text(f"FROM {base_image}\n")
    buildkitd.buildctl(
        *dockerfile_build_args(
            stand_in,
            "--output",
            f"type=image,name={registry.ref('lucity-test/runtime', 'v1')},push=true",
        ),
        docker_config=registry_docker_config,
    )
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Dockerfile").write_text(
        "FROM ghcr.io/lucity-test/runtime:v1\nRUN echo from-the-mirror > /out\n"
        "FROM scratch\nCOPY --from=0 /out /\n"
    )
    build = dockerfile_build_args(context, "--output", f"type=local,dest={tmp_path / 'export'}")

    refused = buildkitd.buildctl(*build, docker_config=empty_docker_config, check=False)
    buildkitd.buildctl(*build, docker_config=registry_docker_config)

    # The mirror is the authenticating test registry: without credentials, no image.
    assert refused.returncode != 0
    assert "401 Unauthorized" in refused.stderr
    assert (tmp_path / "export" / "out").read_text() == "from-the-mirror\n"


def _read_env_file(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        key, value = line.split("=", 1)
        env[key] = shlex.split(value)[0]
    return env


def test_testbed_cli_serves_until_sigterm(tmp_path: Path) -> None:
    env_file = tmp_path / "testbed.env"
    cli = subprocess.Popen(
        [sys.executable, "-m", "tests.testbed", "up", "--env-file", str(env_file)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not env_file.exists():
            assert cli.poll() is None, cli.communicate()[0]
            assert time.monotonic() < deadline, "test bed CLI not ready after 60s"
            time.sleep(0.1)
        env = _read_env_file(env_file)
        daemons = [int(env["LUCITY_BUILDKIT_PID"]), int(env["LUCITY_REGISTRY_PID"])]
        workers = subprocess.run(
            [env["LUCITY_BUILDCTL"], "--addr", env["LUCITY_BUILDKIT_TCP_ADDR"], "debug", "workers"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert "linux/amd64" in workers.stdout
        config = json.loads(
            (Path(env["LUCITY_REGISTRY_DOCKER_CONFIG"]) / "config.json").read_text()
        )
        assert list(config["auths"]) == [env["LUCITY_REGISTRY"]]
        assert env["LUCITY_BASE_IMAGE"] == f"{env['LUCITY_REGISTRY']}/base/busybox:1.35"
    finally:
        cli.send_signal(signal.SIGTERM)
        output = cli.communicate(timeout=60)[0]

    assert cli.returncode == 0, output
    assert "stopped" in output
    assert not env_file.exists()
    for pid in daemons:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()


@pytest.mark.slow
def test_demo_runs_start_to_finish() -> None:
    """The README's first command: it must keep working as the code around it changes."""
    demo = subprocess.run(
        [str(REPO / "scripts" / "demo.sh")],
        cwd=REPO,
        env={**os.environ, "LUCITY_DEMO_SKIP_INSTALL": "1"},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )

    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "sample-app ok: 2 files verified, running as uid 10001" in demo.stdout
    assert "served: <h1>Hello from the Lucity sample app</h1>" in demo.stdout
    assert re.search(r"^digest: sha256:[0-9a-f]{64}$", demo.stdout, re.MULTILINE)
