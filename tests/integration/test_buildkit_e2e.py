"""Issue 4's end-to-end proofs: our Python client against the real daemon and registry.

Every build here is LLB from `build_runner.llb`, solved by `BuildkitClient` with a
`Session` that serves the local context and the registry credentials (read from a
client-side docker config.json). The claims checked, each by a test that can fail:

1. FROM the test registry's base image + COPY of a local context + RUN + push works
   only because the session served the credentials; neither buildkitd's files nor
   its (or rootlesskit's) environment hold them, and a RUN step that searches its
   whole filesystem and every process environment and command line it can read
   finds nothing, while the same search finds the password planted in the context.
2. The digest the client returns is the registry's manifest digest, and the config
   blob carries the user, workdir, env, cmd and labels we set.
3. After a full prune, a build importing the registry cache (mode=max, image
   manifest) reports the RUN step CACHED and yields the identical file.
4. A context of 5,000 files / 100 MB arrives intact (checksums, modes, symlinks,
   empty directories), checked by a RUN step inside the build.
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import hashlib
import io
import json
import os
import secrets
import stat
import tarfile
import urllib.request
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from build_runner import llb
from build_runner._pb.buildkit import control_pb2
from build_runner.buildkit.auth import Credentials, RegistryCredential
from build_runner.buildkit.client import BuildkitClient, ConnectOptions
from build_runner.buildkit.errors import SolveError
from build_runner.buildkit.exports import ImageConfig, ImageExport, RegistryCache, SolveResult
from build_runner.buildkit.progress import PlainProgress, VertexState
from build_runner.buildkit.session import Session
from tests.testbed.buildkit import BuildKit, _descendants, start_buildkitd
from tests.testbed.contexts import (
    DEFAULT_BYTES,
    DEFAULT_FILES,
    DEFAULT_SEED,
    ContextStats,
    expected_manifest,
    generate_context,
)
from tests.testbed.registry import MANIFEST_MEDIA_TYPES, Registry

pytestmark = pytest.mark.buildkit

# The exit code the credential scan uses when it finds something: distinct from
# any shell or busybox error, so the control run can't pass by failing otherwise.
FOUND_EXIT_CODE = 3
SCAN_RESULT = "/scan-result"
# Read files in pieces with an overlap, so a secret spanning two pieces is found.
SCAN_CHUNK_BYTES = 4 * 1024 * 1024


# --- shared helpers ----------------------------------------------------------------------


@pytest.fixture(scope="module")
async def client(buildkitd: BuildKit) -> AsyncIterator[BuildkitClient]:
    async with BuildkitClient(ConnectOptions(address=buildkitd.address)) as c:
        yield c


@dataclasses.dataclass
class Recorder:
    """Collects progress: plain lines plus per-vertex state, for assertions."""

    progress: PlainProgress = dataclasses.field(default_factory=PlainProgress)
    lines: list[str] = dataclasses.field(default_factory=list)

    def __call__(self, message: control_pb2.StatusResponse) -> None:
        self.lines.extend(self.progress.feed(message))

    def vertex(self, name: str) -> VertexState:
        found = [v for v in self.progress.vertices if v.name == name]
        assert len(found) == 1, (name, [v.name for v in self.progress.vertices], self.lines)
        return found[0]


class RecordingCredentials(Credentials):
    """Client credentials that remember which hosts the daemon asked our session for."""

    __slots__ = ("asked",)

    def __init__(self, entries: Mapping[str, RegistryCredential] | None = None) -> None:
        super().__init__(entries)
        self.asked: list[str] = []

    def lookup(self, host: str) -> RegistryCredential | None:
        self.asked.append(host)
        return super().lookup(host)


def recording_credentials(docker_config: Path) -> RecordingCredentials:
    """RecordingCredentials loaded from a client-side DOCKER_CONFIG directory."""
    loaded = RecordingCredentials.from_docker_config_dir(docker_config)
    assert isinstance(loaded, RecordingCredentials)  # the loaders construct `cls`
    return loaded


def _basic_auth(registry: Registry) -> str:
    return base64.b64encode(f"{registry.username}:{registry.password}".encode()).decode()


def registry_get(
    registry: Registry, path: str, *, accept: str | None = None
) -> tuple[dict[str, str], bytes]:
    """An authenticated GET on the registry: headers and body."""
    request = urllib.request.Request(f"http://{registry.host}{path}")
    request.add_header("Authorization", f"Basic {_basic_auth(registry)}")
    if accept:
        request.add_header("Accept", accept)
    with urllib.request.urlopen(request, timeout=30) as response:
        body: bytes = response.read()
        return dict(response.headers.items()), body


def image_layers(registry: Registry, repository: str, tag: str) -> list[dict[str, bytes | None]]:
    """The layers of a pushed single-platform image, bottom first: path -> content."""
    _, raw = registry.manifest(repository, tag)
    layers = []
    for layer in json.loads(raw)["layers"]:
        _, blob = registry_get(registry, f"/v2/{repository}/blobs/{layer['digest']}")
        assert "sha256:" + hashlib.sha256(blob).hexdigest() == layer["digest"]
        if layer["mediaType"].endswith("gzip"):
            blob = gzip.decompress(blob)
        entries: dict[str, bytes | None] = {}
        with tarfile.open(fileobj=io.BytesIO(blob)) as archive:
            for info in archive.getmembers():
                extracted = archive.extractfile(info) if info.isfile() else None
                entries[info.name.rstrip("/")] = extracted.read() if extracted else None
        layers.append(entries)
    return layers


def image_file(registry: Registry, repository: str, tag: str, path: str) -> bytes:
    """A file's content in a pushed image (the topmost layer that has it)."""
    for layer in reversed(image_layers(registry, repository, tag)):
        data = layer.get(path.lstrip("/"))
        if data is not None:
            return data
    raise AssertionError(f"{path} not in {repository}:{tag}")


def base_state(base_image: str, platform: llb.Platform) -> llb.State:
    # The base image's config (tests/fixtures/busybox-base/Dockerfile) sets PATH=/bin;
    # LLB does not apply image config, so the exec environment is set here.
    return llb.image(base_image, platform=platform, name="base").add_env("PATH", "/bin")


def copy_context(base: llb.State, context: llb.State, dest: str) -> llb.State:
    """A Dockerfile-style `COPY . <dest>`."""
    action = llb.copy(
        context,
        "/",
        dest,
        dir_copy_contents=True,
        follow_symlinks=True,
        create_dest_path=True,
        allow_wildcard=True,
        allow_empty_wildcard=True,
    )
    return base.file(action, name=f"COPY context {dest}")


# --- 1 and 2: credentials only in the session; digest and config ---------------------------


def scan_script(patterns: Sequence[bytes]) -> str:
    """A RUN step that looks for `patterns` in every file and readable environment.

    The patterns travel hex-encoded and are decoded into a tmpfs mount (/scan), so
    neither the step's command line, nor its layer, nor the searched tree holds them.
    It writes what it scanned and found to SCAN_RESULT and exits FOUND_EXIT_CODE on
    any hit.
    """
    hex_patterns = b"\n".join(patterns).hex()
    return f"""
set -u
printf %s {hex_patterns} | busybox xxd -r -p > /scan/patterns
echo >> /scan/patterns
scanned=$(find / \\( -path /proc -o -path /sys -o -path /scan \\) -prune -o -type f -print | sort)
hits=$(find / \\( -path /proc -o -path /sys -o -path /scan \\) -prune -o -type f -print0 \\
       | xargs -0 grep -lF -f /scan/patterns 2>/dev/null)
env_hit=$(env | grep -cF -f /scan/patterns)
environs=0
cmdlines=0
proc_hits=""
for f in /proc/[0-9]*/environ /proc/[0-9]*/cmdline; do
  if cat "$f" >/dev/null 2>&1; then
    case "$f" in *environ) environs=$((environs + 1));; *) cmdlines=$((cmdlines + 1));; esac
    if grep -qF -f /scan/patterns "$f" 2>/dev/null; then proc_hits="$proc_hits $f"; fi
  fi
done
{{
  echo "files" $scanned
  echo "environs $environs"
  echo "cmdlines $cmdlines"
  echo "env_hits $env_hit"
  echo "file_hits $hits"
  echo "proc_hits $proc_hits"
}} | tee {SCAN_RESULT}
if [ -n "$hits" ] || [ "$env_hit" != 0 ] || [ -n "$proc_hits" ]; then exit {FOUND_EXIT_CODE}; fi
"""


def secrets_of(registry: Registry) -> list[bytes]:
    """The forms a leaked registry credential would take."""
    return [registry.password.encode(), _basic_auth(registry).encode()]


def app_definition(
    base_image: str, platform: llb.Platform, patterns: Sequence[bytes]
) -> tuple[llb.State, str]:
    """FROM base, COPY the context to /app, RUN the credential scan."""
    context = llb.local("context", shared_key_hint="context", custom_name="context")
    st = copy_context(base_state(base_image, platform), context, "/app/")
    run_name = "scan for registry credentials"
    st = st.run(scan_script(patterns), mounts=[llb.TmpfsMount("/scan")], name=run_name)
    return st, run_name


APP_CONFIG_LABEL = "org.lucity.e2e"


def app_config(platform: llb.Platform, label: str) -> ImageConfig:
    return ImageConfig(
        os=platform.os,
        architecture=platform.architecture,
        env=["PATH=/bin", "APP_MODE=e2e"],
        workdir="/app",
        user="10001:10001",
        cmd=["/bin/sh", "-c", "cat /app/hello.txt"],
        labels={APP_CONFIG_LABEL: label},
    )


@dataclasses.dataclass(frozen=True)
class PushedApp:
    repository: str
    tag: str
    result: SolveResult
    label: str
    context: Path
    scan_output: list[str]
    # Hosts the daemon asked our session's Auth service for during the good build.
    asked_for_credentials: list[str]


@pytest.fixture(scope="module")
async def pushed_app(
    client: BuildkitClient,
    registry: Registry,
    base_image: str,
    registry_docker_config: Path,
    empty_docker_config: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> PushedApp:
    """The app built and pushed once with the session's credentials (after the same
    build without them was refused)."""
    context = tmp_path_factory.mktemp("app-context")
    (context / "hello.txt").write_text("hello from the e2e context\n")
    (context / "sub").mkdir()
    (context / "sub" / "data.bin").write_bytes(os.urandom(4096))
    platform = await client.default_platform()
    st, run_name = app_definition(base_image, platform, secrets_of(registry))
    definition = llb.marshal(st, platform=platform)
    repository, tag = "e2e/app", secrets.token_hex(6)
    label = secrets.token_hex(8)
    export = ImageExport(
        names=[registry.ref(repository, tag)], push=True, config=app_config(platform, label)
    )

    nothing = recording_credentials(empty_docker_config)
    anonymous = Session(credentials=nothing, local_dirs={"context": context})
    with pytest.raises(SolveError, match=r"401 Unauthorized|unauthorized"):
        await client.solve(definition, session=anonymous, exports=[export])
    assert not registry.tag_exists(repository, tag)
    # The daemon did ask our session, which had nothing to give.
    assert registry.host in nothing.asked

    recorder = Recorder()
    credentials = recording_credentials(registry_docker_config)
    session = Session(credentials=credentials, local_dirs={"context": context})
    result = await client.solve(definition, session=session, exports=[export], on_progress=recorder)
    assert not session.failed.is_set(), session.error
    asked_for_credentials = list(credentials.asked)
    scan_output = list(recorder.vertex(run_name).log_tail)
    return PushedApp(repository, tag, result, label, context, scan_output, asked_for_credentials)


def test_push_succeeds_only_with_session_credentials(
    pushed_app: PushedApp, registry: Registry
) -> None:
    assert registry.tag_exists(pushed_app.repository, pushed_app.tag)
    # The credentials came from our session (the daemon's own DOCKER_CONFIG is empty).
    assert registry.host in pushed_app.asked_for_credentials
    # The image is the one we built: the context and the scan result are in it.
    hello = image_file(registry, pushed_app.repository, pushed_app.tag, "/app/hello.txt")
    assert hello == (pushed_app.context / "hello.txt").read_bytes()
    data = image_file(registry, pushed_app.repository, pushed_app.tag, "/app/sub/data.bin")
    assert data == (pushed_app.context / "sub" / "data.bin").read_bytes()
    # Reading it back needs the credentials too: the registry really authenticates.
    path = f"/v2/{pushed_app.repository}/manifests/{pushed_app.tag}"
    assert registry.status(path, auth=False) == 401


def test_run_step_finds_no_credentials(pushed_app: PushedApp, registry: Registry) -> None:
    raw = image_file(registry, pushed_app.repository, pushed_app.tag, SCAN_RESULT).decode()
    result = {key: value for key, _, value in (line.partition(" ") for line in raw.splitlines())}
    # The search really covered the filesystem (the base image, the context, the
    # files the daemon mounts in) and at least the step's own process environment.
    scanned = set(result["files"].split())
    expected = {"/bin/busybox", "/etc/passwd", "/app/hello.txt", "/app/sub/data.bin"}
    assert expected <= scanned, raw
    assert int(result["environs"]) >= 1, raw
    # Without a process sandbox the step shares the host's PID namespace: it can read
    # the command line of every process on the machine (the test bed's daemons, this
    # test) and the environment of its own processes only (checked on the test bed).
    assert int(result["cmdlines"]) >= 10, raw
    assert result["file_hits"].strip() == "", raw
    assert result["env_hits"].strip() == "0", raw
    assert result["proc_hits"].strip() == "", raw
    # The step's output reached us through the progress stream as well.
    assert any(line.startswith("files ") for line in pushed_app.scan_output), pushed_app


async def test_scan_step_finds_a_planted_password(
    registry: Registry, base_image: str, registry_docker_config: Path, tmp_path: Path
) -> None:
    """Control for the RUN-step search: the password planted in the context is found.

    Runs on a private daemon, which is deleted afterwards: the planted password lands
    in the daemon's snapshots, where the shared daemon's own scans would find it.
    """
    context = tmp_path / "leaky-context"
    context.mkdir()
    (context / "hello.txt").write_text("hello\n")
    (context / "leak.txt").write_bytes(b"oops: " + registry.password.encode() + b"\n")
    recorder = Recorder()
    kit = start_buildkitd(insecure_registries=[registry.host], log_path=tmp_path / "bk.log")
    try:
        async with BuildkitClient(ConnectOptions(address=kit.address)) as private:
            platform = await private.default_platform()
            st, run_name = app_definition(base_image, platform, secrets_of(registry))
            session = Session(
                credentials=Credentials.from_docker_config_dir(registry_docker_config),
                local_dirs={"context": context},
            )
            with pytest.raises(SolveError, match=f"exit code: {FOUND_EXIT_CODE}"):
                await private.solve(
                    llb.marshal(st, platform=platform), session=session, on_progress=recorder
                )
    finally:
        kit.stop()
    scan = recorder.vertex(run_name)
    assert any(line.startswith("file_hits") and "/app/leak.txt" in line for line in scan.log_tail)
    assert any(line == "env_hits 0" for line in scan.log_tail), list(scan.log_tail)


def _walk_files(top: Path) -> Iterator[Path]:
    # os.walk, unlike Path.rglob, shrugs off directories the daemon removes meanwhile.
    for dirpath, _, filenames in os.walk(top):
        for name in filenames:
            yield Path(dirpath) / name


def find_secrets(paths: Sequence[Path], needles: Sequence[bytes]) -> tuple[int, list[str]]:
    """Regular files read under `paths` and the files holding any needle."""
    overlap = max(len(n) for n in needles) - 1
    scanned = 0
    hits: list[str] = []
    for top in paths:
        for path in [top] if top.is_file() else _walk_files(top):
            try:
                if not stat.S_ISREG(path.lstat().st_mode):
                    continue
                with path.open("rb") as f:
                    scanned += 1
                    tail = b""
                    while chunk := f.read(SCAN_CHUNK_BYTES):
                        window = tail + chunk
                        if any(n in window for n in needles):
                            hits.append(str(path))
                            break
                        tail = window[-overlap:] if overlap else b""
            except FileNotFoundError:
                continue  # removed by the daemon while we walked
    return scanned, hits


def test_host_scan_finds_a_planted_password(registry: Registry, tmp_path: Path) -> None:
    """Control for the daemon-side search: a secret across a chunk boundary is found."""
    (tmp_path / "deep" / "er").mkdir(parents=True)
    filler = b"x" * (SCAN_CHUNK_BYTES - 5)
    (tmp_path / "deep" / "er" / "blob").write_bytes(filler + registry.password.encode() + b"y")
    (tmp_path / "clean").write_bytes(b"nothing here")
    scanned, hits = find_secrets([tmp_path], secrets_of(registry))
    assert scanned == 2
    assert hits == [str(tmp_path / "deep" / "er" / "blob")]


def test_daemon_side_holds_no_credentials(
    pushed_app: PushedApp, buildkitd: BuildKit, registry: Registry
) -> None:
    needles = secrets_of(registry)
    home = buildkitd.state_dir / "home"
    scanned, hits = find_secrets([buildkitd.root, buildkitd.docker_config, home], needles)
    assert hits == []
    # The root held the pushed image's layers, snapshots and cache metadata.
    assert scanned > 20
    assert list(buildkitd.docker_config.iterdir()) == []

    assert buildkitd.daemon.process is not None
    wrapper = buildkitd.daemon.process.pid
    pids = [wrapper, *_descendants(wrapper)]
    assert buildkitd.pid in pids
    names = set()
    for pid in pids:
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except FileNotFoundError:
            continue  # a short-lived helper process that already exited
        for needle in needles:
            assert needle not in environ, f"credential in the environment of {name} ({pid})"
        if name in ("rootlesskit", "buildkitd"):
            names.add(name)
            # The daemon's DOCKER_CONFIG is the empty, read-only directory.
            assert b"DOCKER_CONFIG=" + str(buildkitd.docker_config).encode() in environ.split(b"\0")
            assert b"DOCKER_AUTH_CONFIG" not in environ
    assert names == {"rootlesskit", "buildkitd"}


def test_digest_and_config_match_the_registry(pushed_app: PushedApp, registry: Registry) -> None:
    headers, body = registry_get(
        registry,
        f"/v2/{pushed_app.repository}/manifests/{pushed_app.tag}",
        accept=", ".join(MANIFEST_MEDIA_TYPES),
    )
    served = headers["Docker-Content-Digest"]
    computed = "sha256:" + hashlib.sha256(body).hexdigest()
    assert pushed_app.result.image_digest == served == computed
    descriptor = pushed_app.result.descriptor
    assert descriptor is not None
    assert descriptor.digest == served
    assert descriptor.size == len(body)
    assert pushed_app.result.image_names == [registry.ref(pushed_app.repository, pushed_app.tag)]

    manifest = json.loads(body)
    assert manifest["config"]["digest"] == pushed_app.result.config_digest
    _, config_blob = registry_get(
        registry, f"/v2/{pushed_app.repository}/blobs/{manifest['config']['digest']}"
    )
    assert "sha256:" + hashlib.sha256(config_blob).hexdigest() == manifest["config"]["digest"]
    config = json.loads(config_blob)
    assert config["config"]["User"] == "10001:10001"
    assert config["config"]["WorkingDir"] == "/app"
    assert config["config"]["Env"] == ["PATH=/bin", "APP_MODE=e2e"]
    assert config["config"]["Cmd"] == ["/bin/sh", "-c", "cat /app/hello.txt"]
    assert config["config"]["Labels"] == {APP_CONFIG_LABEL: pushed_app.label}
    # rootfs is the real layer list: base + COPY + RUN.
    assert len(config["rootfs"]["diff_ids"]) == len(manifest["layers"]) == 3


# --- 3: registry cache survives a prune ----------------------------------------------------------


@pytest.mark.slow
async def test_cache_import_after_prune_serves_run_from_cache(
    client: BuildkitClient,
    registry: Registry,
    base_image: str,
    registry_docker_config: Path,
    tmp_path: Path,
) -> None:
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "input.txt").write_text(secrets.token_hex(16))
    platform = await client.default_platform()
    run_name = "stamp"
    st = copy_context(
        base_state(base_image, platform),
        llb.local("context", shared_key_hint="context"),
        "/app/",
    )
    # Different on every real execution: only a cache hit can reproduce it.
    st = st.run(
        "head -c 32 /dev/urandom | busybox xxd -p -c 32 > /stamp; date +%s >> /stamp; cat /stamp",
        name=run_name,
    )
    definition = llb.marshal(st, platform=platform)
    credentials = Credentials.from_docker_config_dir(registry_docker_config)
    cache = RegistryCache(ref=registry.ref("e2e/cache", f"buildcache-{secrets.token_hex(4)}"))
    repository = "e2e/cache"

    async def build(
        tag: str,
        *,
        cache_imports: Sequence[RegistryCache] = (),
        cache_exports: Sequence[RegistryCache] = (),
    ) -> Recorder:
        recorder = Recorder()
        session = Session(credentials=credentials, local_dirs={"context": context})
        await client.solve(
            definition,
            session=session,
            exports=[ImageExport(names=[registry.ref(repository, tag)], push=True)],
            cache_imports=cache_imports,
            cache_exports=cache_exports,
            on_progress=recorder,
        )
        return recorder

    first = await build("first", cache_exports=[cache])
    assert not first.vertex(run_name).cached
    assert first.vertex(run_name).log_tail, first.lines
    cache_tag = cache.ref.rsplit(":", 1)[1]
    assert registry.tag_exists(repository, cache_tag)
    media_type, cache_manifest = registry.manifest(repository, cache_tag)
    assert media_type == "application/vnd.oci.image.manifest.v1+json"
    assert json.loads(cache_manifest)["config"]["mediaType"] == (
        "application/vnd.buildkit.cacheconfig.v0"
    )

    pruned = await client.prune(all=True)
    assert pruned.records > 0
    second = await build("second", cache_imports=[cache])
    run = second.vertex(run_name)
    assert run.cached, second.lines
    assert not run.log_tail, "the RUN step was executed again"
    assert any(
        line.endswith(" CACHED") and line.startswith(f"#{run.index} ") for line in second.lines
    )
    stamp = image_file(registry, repository, "first", "/stamp")
    random_hex, _ = stamp.split(b"\n", 1)
    assert len(random_hex) == 64, stamp
    assert image_file(registry, repository, "second", "/stamp") == stamp

    # Control: after another prune, without the import the step really runs again.
    await client.prune(all=True)
    third = await build("third")
    assert not third.vertex(run_name).cached
    assert image_file(registry, repository, "third", "/stamp") != stamp


# --- 4: a big context arrives intact ----------------------------------------------------------


CONTEXT_SEED = DEFAULT_SEED
CONTEXT_FILES = DEFAULT_FILES
CONTEXT_BYTES = DEFAULT_BYTES


MANIFEST_SCRIPT = """
set -eu
mkdir /out
cd /ctx
find . -mindepth 1 -exec stat -c '%F|%a|%n' {} + > /out/stat
find . -type f -exec sha256sum {} + > /out/sums
find . -type l | while IFS= read -r p; do echo "$p|$(readlink "$p")"; done > /out/links
wc -l /out/stat /out/sums /out/links
"""


@pytest.fixture(scope="module")
def big_context(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ContextStats]:
    root = tmp_path_factory.mktemp("big") / "context"
    stats = generate_context(
        root, seed=CONTEXT_SEED, files=CONTEXT_FILES, total_bytes=CONTEXT_BYTES
    )
    return root, stats


def test_generated_context_is_reproducible(tmp_path: Path) -> None:
    """The fixed seed gives the same tree twice (small instance of the same generator)."""
    a = generate_context(tmp_path / "a", seed=7, files=60, total_bytes=200_000)
    b = generate_context(tmp_path / "b", seed=7, files=60, total_bytes=200_000)
    assert a == b
    assert expected_manifest(tmp_path / "a") == expected_manifest(tmp_path / "b")
    generate_context(tmp_path / "c", seed=8, files=60, total_bytes=200_000)
    assert expected_manifest(tmp_path / "a") != expected_manifest(tmp_path / "c")


@pytest.mark.slow
async def test_large_context_arrives_intact(
    client: BuildkitClient,
    registry: Registry,
    base_image: str,
    registry_docker_config: Path,
    big_context: tuple[Path, ContextStats],
) -> None:
    root, generated = big_context
    assert generated.files == CONTEXT_FILES
    assert generated.bytes == CONTEXT_BYTES
    platform = await client.default_platform()
    context = llb.local("context", shared_key_hint="big-context", custom_name="big context")
    st = base_state(base_image, platform).run(
        MANIFEST_SCRIPT,
        mounts=[llb.BindMount("/ctx", context.output, readonly=True)],
        name="checksum the context",
    )
    repository, tag = "e2e/big-context", secrets.token_hex(6)
    recorder = Recorder()
    session = Session(
        credentials=Credentials.from_docker_config_dir(registry_docker_config),
        local_dirs={"context": root},
    )
    await client.solve(
        llb.marshal(st, platform=platform),
        session=session,
        exports=[ImageExport(names=[registry.ref(repository, tag)], push=True)],
        on_progress=recorder,
    )
    (out,) = [layer for layer in image_layers(registry, repository, tag) if "out/stat" in layer]

    def lines(name: str) -> set[str]:
        data = out[f"out/{name}"]
        assert data is not None
        return set(data.decode().splitlines())

    want_stats, want_sums, want_links = expected_manifest(root)
    assert len(want_sums) == CONTEXT_FILES
    assert len(want_links) == generated.symlinks
    got_stats, got_sums, got_links = lines("stat"), lines("sums"), lines("links")
    assert got_sums == want_sums, sorted(got_sums ^ want_sums)[:20]
    assert got_links == want_links, sorted(got_links ^ want_links)[:20]
    assert got_stats == want_stats, sorted(got_stats ^ want_stats)[:20]
    # The empty directories are there, not merely absent from both sides.
    empty = {s for s in got_stats if s.startswith("directory|") and "/empty" in s}
    assert len(empty) >= generated.empty_dirs
    # The transfer really carried the bytes (statuses "transferring context: ...").
    assert any("transferring" in line for line in recorder.lines), recorder.lines[:40]
