"""Registry credentials for the session: docker config.json parsing and the Auth servicer.

Owns reading `auths` from a docker `config.json` into an immutable, in-memory
`Credentials` store and answering the daemon's `moby.filesync.v1.Auth` calls
from it (BuildKit's `session/auth/authprovider`). Secrets never leave memory:
nothing here writes a file, and no repr or error message shows a secret.
Credential helpers (`credsStore`, `credHelpers`) and `registrytoken` are not
supported: such entries yield no credentials.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import os
import types
from collections.abc import Mapping
from pathlib import Path

import grpc

from build_runner._pb.buildkit import auth_pb2, auth_pb2_grpc
from build_runner.buildkit.errors import BuildkitError

# Docker Hub credentials live under this key in config.json (docker/cli's
# IndexServer), while the daemon asks for the host it actually contacts.
DOCKER_HUB_KEY = "https://index.docker.io/v1/"
DOCKER_HUB_HOSTS = frozenset({"registry-1.docker.io", "docker.io", "index.docker.io"})


class DockerConfigError(BuildkitError):
    """The docker config file can't be read or has a malformed entry."""


@dataclasses.dataclass(frozen=True, slots=True)
class RegistryCredential:
    """What the daemon gets for one registry: a username (may be empty) and a secret."""

    username: str
    secret: str = dataclasses.field(repr=False)


def normalize_registry_key(key: str) -> str:
    """A config.json key as a bare host: scheme and anything after the first "/" stripped."""
    host = key
    for scheme in ("http://", "https://"):
        if host.startswith(scheme):
            host = host[len(scheme) :]
            break
    return host.partition("/")[0]


def _decode_auth(key: str, value: str) -> tuple[str, str]:
    try:
        decoded = base64.b64decode(value, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise DockerConfigError(f"auths[{key!r}].auth is not valid base64") from exc
    username, sep, password = decoded.partition(":")
    if not sep:
        raise DockerConfigError(f"auths[{key!r}].auth is not username:password")
    # docker/cli's decodeAuth trims NULs some tools leave around the password.
    return username, password.strip("\x00")


def _credential_from_entry(key: str, entry: object) -> RegistryCredential | None:
    if not isinstance(entry, dict):
        raise DockerConfigError(f"auths[{key!r}] is not an object")
    fields: dict[str, str] = {}
    for name in ("auth", "username", "password", "identitytoken"):
        value = entry.get(name, "")
        if not isinstance(value, str):
            raise DockerConfigError(f"auths[{key!r}].{name} is not a string")
        fields[name] = value
    username, password = fields["username"], fields["password"]
    if fields["auth"]:
        # As in docker/cli's config file loader, `auth` wins over explicit fields.
        username, password = _decode_auth(key, fields["auth"])
    if fields["identitytoken"]:
        # BuildKit's auth provider sends an identity token as the secret of an
        # empty username; the daemon then uses the OAuth refresh_token grant.
        return RegistryCredential(username="", secret=fields["identitytoken"])
    if not username and not password:
        return None
    return RegistryCredential(username=username, secret=password)


class Credentials:
    """An immutable host -> credential store held only in memory."""

    __slots__ = ("_exact", "_normalized")

    def __init__(self, entries: Mapping[str, RegistryCredential] | None = None) -> None:
        exact = dict(entries or {})
        normalized: dict[str, RegistryCredential] = {}
        # Sorted so that which key wins a normalization clash doesn't depend on
        # file order; an exact key still beats every normalized one.
        for key in sorted(exact):
            normalized.setdefault(normalize_registry_key(key), exact[key])
        self._exact = types.MappingProxyType(exact)
        self._normalized = types.MappingProxyType(normalized)

    @classmethod
    def from_docker_config(cls, path: str | os.PathLike[str]) -> Credentials:
        """Load the `auths` of a docker config.json file; a missing file means no credentials."""
        try:
            raw = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls()
        except OSError as exc:
            raise DockerConfigError(f"cannot read docker config {os.fspath(path)}: {exc}") from exc
        return cls.from_json(raw)

    @classmethod
    def from_docker_config_dir(cls, directory: str | os.PathLike[str]) -> Credentials:
        """Load `<directory>/config.json`, as DOCKER_CONFIG names a directory."""
        return cls.from_docker_config(Path(directory) / "config.json")

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> Credentials:
        """Load from $DOCKER_CONFIG, else ~/.docker, as docker and buildctl do."""
        directory = environ.get("DOCKER_CONFIG")
        if not directory:
            home = environ.get("HOME")
            if not home:
                return cls()
            directory = os.path.join(home, ".docker")
        return cls.from_docker_config_dir(directory)

    @classmethod
    def from_json(cls, raw: str) -> Credentials:
        """Parse the text of a config.json."""
        try:
            document = json.loads(raw)
        except json.JSONDecodeError as exc:
            # The message names the position only: the text may hold secrets.
            raise DockerConfigError(
                f"docker config is not valid JSON (line {exc.lineno}, column {exc.colno})"
            ) from None
        if not isinstance(document, dict):
            raise DockerConfigError("docker config is not a JSON object")
        auths = document.get("auths")
        if auths is None:
            auths = {}
        if not isinstance(auths, dict):
            raise DockerConfigError("docker config `auths` is not an object")
        entries: dict[str, RegistryCredential] = {}
        for key, entry in auths.items():
            credential = _credential_from_entry(key, entry)
            if credential is not None:
                entries[key] = credential
        return cls(entries)

    @property
    def hosts(self) -> list[str]:
        """The configured keys, without any secret."""
        return sorted(self._exact)

    def lookup(self, host: str) -> RegistryCredential | None:
        """The credential for a registry host as the daemon names it (with port), if any."""
        found = self._exact.get(host) or self._normalized.get(normalize_registry_key(host))
        if found is None and host in DOCKER_HUB_HOSTS:
            found = self._exact.get(DOCKER_HUB_KEY)
            for alias in sorted(DOCKER_HUB_HOSTS):
                found = found or self._normalized.get(alias)
        return found

    def __repr__(self) -> str:
        return f"Credentials(hosts={self.hosts!r})"

    def __len__(self) -> int:
        return len(self._exact)


class AuthServicer(auth_pb2_grpc.AuthServicer):
    """Answers `Auth.Credentials` from memory; the token-authority methods stay UNIMPLEMENTED.

    Without a token authority the daemon falls back to Credentials and talks to
    the registry's token endpoint itself (BuildKit `util/resolver/authorizer.go`).
    """

    def __init__(self, credentials: Credentials) -> None:
        self._store = credentials

    async def Credentials(
        self,
        request: auth_pb2.CredentialsRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> auth_pb2.CredentialsResponse:
        found = self._store.lookup(request.Host)
        if found is None:
            # An error would fail the pull/push; empty means "anonymous".
            return auth_pb2.CredentialsResponse()
        return auth_pb2.CredentialsResponse(Username=found.username, Secret=found.secret)

    async def FetchToken(
        self, request: auth_pb2.FetchTokenRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> auth_pb2.FetchTokenResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no token authority in this session")
        raise AssertionError("abort returned")  # pragma: no cover

    async def GetTokenAuthority(
        self,
        request: auth_pb2.GetTokenAuthorityRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> auth_pb2.GetTokenAuthorityResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no token authority in this session")
        raise AssertionError("abort returned")  # pragma: no cover

    async def VerifyTokenAuthority(
        self,
        request: auth_pb2.VerifyTokenAuthorityRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> auth_pb2.VerifyTokenAuthorityResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no token authority in this session")
        raise AssertionError("abort returned")  # pragma: no cover
