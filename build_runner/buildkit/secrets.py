"""The session's Secrets servicer: secret mounts and secret env vars served from memory.

Owns `moby.buildkit.secrets.v1.Secrets/GetSecret` (BuildKit
`session/secrets/secretsprovider`). Values are copied into an immutable mapping
at construction, never written anywhere, and never shown by repr or errors.
"""

from __future__ import annotations

import types
from collections.abc import Mapping

import grpc

from build_runner._pb.buildkit import secrets_pb2, secrets_pb2_grpc


class SecretsServicer(secrets_pb2_grpc.SecretsServicer):
    """Answers GetSecret by id; an unknown id is NOT_FOUND, as BuildKit's provider does.

    The daemon turns NOT_FOUND into "secret <id>: not found", which fails the
    step unless the mount is optional.
    """

    def __init__(self, secrets: Mapping[str, bytes]) -> None:
        self._secrets = types.MappingProxyType(dict(secrets))

    @property
    def ids(self) -> list[str]:
        """The served secret ids (never their values)."""
        return sorted(self._secrets)

    def __repr__(self) -> str:
        return f"SecretsServicer(ids={self.ids!r})"

    async def GetSecret(
        self,
        request: secrets_pb2.GetSecretRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> secrets_pb2.GetSecretResponse:
        data = self._secrets.get(request.ID)
        if data is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"secret {request.ID!r} not found")
        return secrets_pb2.GetSecretResponse(data=data)
