"""An authenticating OCI registry on loopback: Debian's docker-registry (distribution 2.8).

Owns: writing the registry's config and htpasswd file, starting and stopping it,
writing CLIENT-side docker config.json files holding its credentials, and small
authenticated HTTP reads (manifest digests, tags) for assertions. It never hands
credentials to buildkitd: the daemon must only ever get them from a client session.
Usable outside pytest (see tests/testbed/__main__.py).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import shutil
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.testbed.process import Daemon, DaemonError, free_port

REGISTRY_BINARY = "docker-registry"
HTPASSWD_BINARY = "htpasswd"
DEFAULT_USERNAME = "lucity"

# Everything buildkitd may push: OCI and Docker schema 2, single images and indexes.
MANIFEST_MEDIA_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)

# Startup takes well under a second here; the bound only turns a hang into a clear error.
READY_TIMEOUT_S = 30.0
HTTP_TIMEOUT_S = 10.0
# One readiness probe must not stall the loop (e.g. on a port someone else holds) long
# past the point where the registry process has already exited with an error.
PROBE_TIMEOUT_S = 1.0


class RegistryHTTPError(RuntimeError):
    """The registry answered an assertion helper's request with an unexpected status."""

    def __init__(self, status: int, url: str, body: str) -> None:
        super().__init__(f"registry answered {status} for {url}: {body[:300]}")
        self.status = status


@dataclass
class Registry:
    """A running registry: where it listens, who may push, and its process."""

    host: str
    """`127.0.0.1:PORT`, the registry part of image references."""
    username: str
    password: str
    storage: Path
    config_path: Path
    log_path: Path
    daemon: Daemon

    @property
    def pid(self) -> int:
        """Process id of the registry."""
        assert self.daemon.process is not None
        return self.daemon.process.pid

    def ref(self, repository: str, tag: str) -> str:
        """A full image reference in this registry, e.g. 127.0.0.1:5000/app/web:v1."""
        return f"{self.host}/{repository}:{tag}"

    def write_docker_config(self, directory: Path) -> Path:
        """Write a CLIENT-side docker config.json with this registry's credentials.

        Point a client's DOCKER_CONFIG at `directory`; never a daemon's.
        """
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o700)
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        path = directory / "config.json"
        path.write_text(json.dumps({"auths": {self.host: {"auth": token}}}, indent=2) + "\n")
        path.chmod(0o600)
        return path

    def _request(
        self,
        path: str,
        *,
        method: str = "GET",
        accept: str | None = None,
        auth: bool = True,
        timeout_s: float = HTTP_TIMEOUT_S,
    ) -> tuple[int, dict[str, str], bytes]:
        url = f"http://{self.host}{path}"
        request = urllib.request.Request(url, method=method)
        if accept:
            request.add_header("Accept", accept)
        if auth:
            token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return response.status, dict(response.headers.items()), response.read()
        except urllib.error.HTTPError as exc:
            # 4xx/5xx are answers, not transport failures: hand them back to the caller.
            with exc:
                return exc.code, dict(exc.headers.items()), exc.read()

    def status(self, path: str, *, auth: bool = True, timeout_s: float = HTTP_TIMEOUT_S) -> int:
        """HTTP status of a GET on a registry path, e.g. status("/v2/", auth=False) == 401."""
        return self._request(path, auth=auth, timeout_s=timeout_s)[0]

    def manifest(self, repository: str, reference: str) -> tuple[str, bytes]:
        """Media type and raw bytes of a manifest (by tag or digest), fetched with auth."""
        url_path = f"/v2/{repository}/manifests/{reference}"
        status, headers, body = self._request(url_path, accept=", ".join(MANIFEST_MEDIA_TYPES))
        if status != 200:
            raise RegistryHTTPError(status, url_path, body.decode(errors="replace"))
        return headers.get("Content-Type", ""), body

    def manifest_digest(self, repository: str, reference: str) -> str:
        """The digest of the manifest a tag points to, checked against the bytes served."""
        url_path = f"/v2/{repository}/manifests/{reference}"
        status, headers, body = self._request(url_path, accept=", ".join(MANIFEST_MEDIA_TYPES))
        if status != 200:
            raise RegistryHTTPError(status, url_path, body.decode(errors="replace"))
        computed = "sha256:" + hashlib.sha256(body).hexdigest()
        served = headers.get("Docker-Content-Digest", computed)
        if served != computed:
            raise RegistryHTTPError(status, url_path, f"digest header {served} != body {computed}")
        return computed

    def tags(self, repository: str) -> list[str]:
        """Tags of a repository; empty if the repository does not exist."""
        url_path = f"/v2/{repository}/tags/list"
        status, _, body = self._request(url_path)
        if status == 404:
            return []
        if status != 200:
            raise RegistryHTTPError(status, url_path, body.decode(errors="replace"))
        tags: list[str] = json.loads(body).get("tags") or []
        return tags

    def tag_exists(self, repository: str, tag: str) -> bool:
        """True if repository:tag resolves to a manifest."""
        return tag in self.tags(repository)

    def stop(self) -> None:
        """Stop the registry process (its storage stays for inspection until removed)."""
        self.daemon.stop()


def _htpasswd_line(username: str, password: str) -> str:
    tool = shutil.which(HTPASSWD_BINARY)
    if tool is None:
        raise DaemonError(
            "htpasswd not found (Debian package apache2-utils); run scripts/install-testbed.sh apt"
        )
    # -i reads the password from stdin so it never shows up in a process list.
    result = subprocess.run(
        [tool, "-niB", username],
        input=password,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise DaemonError(f"htpasswd failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout.strip() + "\n"


def write_config(workdir: Path, *, port: int, username: str, password: str) -> Path:
    """Write htpasswd and config.yml for a registry on 127.0.0.1:port under workdir."""
    storage = workdir / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    htpasswd = workdir / "htpasswd"
    htpasswd.write_text(_htpasswd_line(username, password))
    htpasswd.chmod(0o600)
    config = workdir / "config.yml"
    # JSON is valid YAML; writing it this way needs no YAML library and no quoting rules.
    config.write_text(
        json.dumps(
            {
                "version": 0.1,
                "log": {"level": "info"},
                "storage": {
                    "filesystem": {"rootdirectory": str(storage)},
                    "delete": {"enabled": True},
                },
                "http": {"addr": f"127.0.0.1:{port}"},
                "auth": {"htpasswd": {"realm": "lucity-test", "path": str(htpasswd)}},
            },
            indent=2,
        )
        + "\n"
    )
    return config


def start_registry(
    workdir: Path,
    *,
    username: str = DEFAULT_USERNAME,
    password: str | None = None,
    log_path: Path | None = None,
    port: int | None = None,
    timeout_s: float = READY_TIMEOUT_S,
) -> Registry:
    """Start docker-registry with htpasswd auth on a free loopback port; wait until ready.

    Ready means /v2/ answers 401 without credentials and 200 with them, so a registry
    that somehow came up without auth fails here instead of making tests vacuous.
    """
    binary = shutil.which(REGISTRY_BINARY)
    if binary is None:
        raise DaemonError(
            "docker-registry not found (Debian package docker-registry); "
            "run scripts/install-testbed.sh apt"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    password = password or secrets.token_urlsafe(24)
    port = port or free_port()
    config = write_config(workdir, port=port, username=username, password=password)
    daemon = Daemon(
        name="docker-registry",
        argv=[binary, "serve", str(config)],
        log_path=log_path or workdir / "registry.log",
        # A clean environment: the registry reads REGISTRY_* overrides from it.
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(workdir)},
        cwd=workdir,
    ).start()
    registry = Registry(
        host=f"127.0.0.1:{port}",
        username=username,
        password=password,
        storage=workdir / "storage",
        config_path=config,
        log_path=daemon.log_path,
        daemon=daemon,
    )
    try:
        daemon.wait_ready(
            lambda: registry.status("/v2/", auth=False, timeout_s=PROBE_TIMEOUT_S) == 401,
            timeout_s=timeout_s,
        )
        if registry.status("/v2/") != 200:
            raise DaemonError(
                f"docker-registry on {registry.host} rejects its own credentials; "
                f"log {daemon.log_path}:\n{daemon.log_tail()}"
            )
    except BaseException:
        daemon.stop()
        raise
    return registry
