"""Build the demo's sample app with our Python BuildKit client and push it.

Owns only the demo's build step (scripts/demo.sh calls it): the same steps as
tests/fixtures/sample-app/Dockerfile, written as LLB with `build_runner.llb`,
solved by `BuildkitClient` with a `Session` that serves the context and the
registry credentials from a CLIENT-side docker config (buildkitd holds none).
Prints plain progress, then the image reference and digest; `--metadata-file`
writes the exporter response as JSON, as `buildctl --metadata-file` does.

The base image's config (Env, WorkingDir, ...) is read from the registry over
HTTP(S) with the same credentials, Basic auth only: enough for the test bed's
htpasswd registry, not for token (Bearer) registries.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from build_runner import llb
from build_runner._pb.buildkit import control_pb2
from build_runner.buildkit.auth import Credentials
from build_runner.buildkit.client import BuildkitClient, ConnectOptions
from build_runner.buildkit.exports import ImageConfig, ImageExport, SolveResult
from build_runner.buildkit.progress import PlainProgress
from build_runner.buildkit.session import Session

MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
INDEX_TYPES = MANIFEST_TYPES[0], MANIFEST_TYPES[2]
HTTP_TIMEOUT_S = 30.0

# What the sample app's Dockerfile does after FROM (tests/fixtures/sample-app/Dockerfile).
APP_USER = "10001:10001"
APP_PORT = "8080"
APP_CMD = ["/srv/bin/sample-app", "serve"]
CHECKSUM_STEP = (
    "cd /srv/www && find . -type f | sort | xargs sha256sum > /srv/site.sha256"
    " && chmod 0555 /srv/bin/sample-app"
)


def _split_ref(ref: str) -> tuple[str, str, str]:
    """host, repository, tag-or-digest of a fully qualified reference."""
    host, _, rest = llb.normalize_image_ref(ref).partition("/")
    if "@" in rest:
        repository, _, reference = rest.partition("@")
    else:
        repository, _, reference = rest.rpartition(":")
    return host, repository, reference


def _get(url: str, auth: str | None, accept: str | None = None) -> tuple[str, bytes]:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", auth)
    if accept:
        request.add_header("Accept", accept)
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
            body: bytes = response.read()
            return response.headers.get("Content-Type", ""), body
    except urllib.error.HTTPError as exc:
        with exc:
            raise SystemExit(f"GET {url}: {exc.code} {exc.reason}") from None


def fetch_image_config(ref: str, credentials: Credentials, platform: llb.Platform) -> Any:
    """The base image's config JSON, fetched with the client's registry credentials."""
    host, repository, reference = _split_ref(ref)
    loopback = host.split(":")[0] in ("127.0.0.1", "localhost")
    base = f"{'http' if loopback else 'https'}://{host}/v2/{repository}"
    credential = credentials.lookup(host)
    auth = None
    if credential is not None:
        token = base64.b64encode(f"{credential.username}:{credential.secret}".encode()).decode()
        auth = f"Basic {token}"
    media_type, body = _get(f"{base}/manifests/{reference}", auth, ", ".join(MANIFEST_TYPES))
    manifest = json.loads(body)
    if media_type in INDEX_TYPES or "manifests" in manifest:
        wanted = (platform.os, platform.architecture)
        for entry in manifest["manifests"]:
            p = entry.get("platform", {})
            if (p.get("os"), p.get("architecture")) == wanted:
                _, body = _get(f"{base}/manifests/{entry['digest']}", auth, MANIFEST_TYPES[1])
                manifest = json.loads(body)
                break
        else:
            raise SystemExit(f"{ref} has no image for {platform.os}/{platform.architecture}")
    _, config = _get(f"{base}/blobs/{manifest['config']['digest']}", auth)
    return json.loads(config)


def _merge_env(base: Sequence[str], changes: Mapping[str, str]) -> list[str]:
    """Dockerfile ENV semantics: a later value replaces the same key in place."""
    merged = {entry.partition("=")[0]: entry for entry in base}
    for key, value in changes.items():
        merged[key] = f"{key}={value}"
    return list(merged.values())


def sample_app(
    base_ref: str, base_config: Mapping[str, Any], platform: llb.Platform
) -> tuple[llb.State, ImageConfig]:
    """The sample app's Dockerfile as LLB plus the image config it produces."""
    config = base_config.get("config") or {}
    base_env: list[str] = list(config.get("Env") or [])
    workdir: str = config.get("WorkingDir") or "/"
    st = llb.image(base_ref, platform=platform, name=f"FROM {base_ref}")
    for entry in base_env:
        key, _, value = entry.partition("=")
        st = st.add_env(key, value)
    st = st.dir(workdir)
    context = llb.local(
        "context",
        include_patterns=["site", "bin/sample-app"],
        shared_key_hint="sample-app",
        custom_name="load build context",
    )
    for src, dest in (("/site/", "/srv/www/"), ("/bin/sample-app", "/srv/bin/sample-app")):
        # Dockerfile COPY's options (buildkit-protocol.md §4.4).
        action = llb.copy(
            context,
            src,
            dest,
            dir_copy_contents=True,
            follow_symlinks=True,
            create_dest_path=True,
            allow_wildcard=True,
            allow_empty_wildcard=True,
        )
        st = st.file(action, name=f"COPY {src.lstrip('/')} {dest}")
    st = st.run(CHECKSUM_STEP, name=f"RUN {CHECKSUM_STEP}")
    image_config = ImageConfig(
        os=platform.os,
        architecture=platform.architecture,
        variant=platform.variant,
        env=_merge_env(base_env, {"PORT": APP_PORT}),
        workdir=workdir,
        user=APP_USER,
        cmd=APP_CMD,
        labels=dict(config.get("Labels") or {}),
        exposed_ports=[APP_PORT],
    )
    return st, image_config


async def build(args: argparse.Namespace) -> SolveResult:
    credentials = (
        Credentials.from_docker_config_dir(args.docker_config)
        if args.docker_config
        else Credentials.from_environment(os.environ)
    )
    progress = PlainProgress()

    def show(message: control_pb2.StatusResponse) -> None:
        for line in progress.feed(message):
            print(line, flush=True)

    async with BuildkitClient(ConnectOptions(address=args.addr)) as client:
        platform = await client.default_platform()
        base_config = await asyncio.to_thread(fetch_image_config, args.base, credentials, platform)
        state, image_config = sample_app(args.base, base_config, platform)
        session = Session(credentials=credentials, local_dirs={"context": args.context})
        result = await client.solve(
            llb.marshal(state, platform=platform),
            session=session,
            exports=[ImageExport(names=[args.ref], push=True, config=image_config)],
            on_progress=show,
        )
    for line in progress.finish():
        print(line)
    return result


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo_build.py", description=__doc__)
    parser.add_argument("--addr", required=True, help="buildkitd address (unix:// or tcp://)")
    parser.add_argument("--base", required=True, help="base image reference (FROM)")
    parser.add_argument("--context", required=True, type=Path, help="the sample app directory")
    parser.add_argument("--ref", required=True, help="image reference to push")
    parser.add_argument(
        "--docker-config", type=Path, help="client DOCKER_CONFIG dir (default: $DOCKER_CONFIG)"
    )
    parser.add_argument("--metadata-file", type=Path, help="write the exporter response here")
    args = parser.parse_args(argv)
    result = asyncio.run(build(args))
    if args.metadata_file:
        args.metadata_file.write_text(json.dumps(dict(result.exporter_response), indent=2) + "\n")
    print(f"image:  {args.ref}")
    print(f"digest: {result.image_digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
