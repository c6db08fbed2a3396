"""Typed exporter and cache options for a solve, turned into BuildKit's string maps.

Owns the attribute names and value formats the daemon reads (moby/buildkit
`exporter/containerimage/exptypes/keys.go`, `exporter/containerimage/opts.go`,
`cache/remotecache/registry/registry.go`) and the OCI image config JSON passed as
the `containerimage.config` exporter attribute. Also reads the exporter
response back. Pure: no grpc calls, no I/O.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from build_runner._pb.buildkit import control_pb2

# Exporter response keys (exporter/containerimage/exptypes/types.go).
RESPONSE_IMAGE_DIGEST = "containerimage.digest"
RESPONSE_CONFIG_DIGEST = "containerimage.config.digest"
RESPONSE_DESCRIPTOR = "containerimage.descriptor"
RESPONSE_IMAGE_NAME = "image.name"
RESPONSE_CACHE_MANIFEST = "cache.manifest"


def _bool(value: bool) -> str:
    return "true" if value else "false"


@dataclass(frozen=True)
class HistoryEntry:
    """One OCI history entry; give one per layer (plus empty ones) for reproducible digests."""

    created_by: str = ""
    created: str | None = None
    comment: str = ""
    empty_layer: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.created is not None:
            out["created"] = self.created
        if self.created_by:
            out["created_by"] = self.created_by
        if self.comment:
            out["comment"] = self.comment
        if self.empty_layer:
            out["empty_layer"] = True
        return out


@dataclass(frozen=True)
class ImageConfig:
    """The OCI image config the exporter writes (its `rootfs` is always replaced).

    Without one, a Definition solve gets the daemon's default config (PATH only,
    WorkingDir `/`): nothing from the base image is inherited, so callers
    merge the base config and their changes here. `history` and `created`, when
    given, are kept verbatim, which makes the image digest reproducible across
    fresh and cache-imported builds (buildkit-protocol.md §10.1).
    """

    os: str
    architecture: str
    variant: str = ""
    env: Sequence[str] = ()
    workdir: str = ""
    user: str = ""
    cmd: Sequence[str] | None = None
    entrypoint: Sequence[str] | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    exposed_ports: Sequence[str] = ()
    stop_signal: str = ""
    history: Sequence[HistoryEntry] | None = None
    created: str | None = None

    def to_json(self) -> str:
        """Compact JSON with sorted keys, so equal configs give equal bytes."""
        if not self.os or not self.architecture:
            # The exporter rejects this too ("missing os"); fail before a solve.
            raise ValueError("image config needs os and architecture")
        config: dict[str, Any] = {}
        if self.env:
            config["Env"] = list(self.env)
        if self.workdir:
            config["WorkingDir"] = self.workdir
        if self.user:
            config["User"] = self.user
        if self.cmd is not None:
            config["Cmd"] = list(self.cmd)
        if self.entrypoint is not None:
            config["Entrypoint"] = list(self.entrypoint)
        if self.labels:
            config["Labels"] = dict(self.labels)
        if self.exposed_ports:
            config["ExposedPorts"] = {p if "/" in p else f"{p}/tcp": {} for p in self.exposed_ports}
        if self.stop_signal:
            config["StopSignal"] = self.stop_signal
        doc: dict[str, Any] = {
            "os": self.os,
            "architecture": self.architecture,
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": []},
        }
        if self.variant:
            doc["variant"] = self.variant
        if self.history is not None:
            doc["history"] = [h.to_json() for h in self.history]
        if self.created is not None:
            doc["created"] = self.created
        return json.dumps(doc, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class ImageExport:
    """The `image` exporter: name the result, optionally push it, with our config."""

    names: Sequence[str]
    push: bool = False
    config: ImageConfig | None = None
    # Allow plain HTTP / unverified TLS to the push target.
    insecure_registry: bool = False
    push_by_digest: bool = False
    oci_mediatypes: bool | None = None
    compression: str | None = None
    # Extra attributes as the daemon spells them, e.g. `annotation.org.opencontainers...`.
    attrs: Mapping[str, str] = field(default_factory=dict)

    def to_pb(self) -> control_pb2.Exporter:
        attrs: dict[str, str] = dict(self.attrs)
        if self.names:
            attrs["name"] = ",".join(self.names)
        attrs["push"] = _bool(self.push)
        if self.push_by_digest:
            attrs["push-by-digest"] = "true"
        if self.insecure_registry:
            attrs["registry.insecure"] = "true"
        if self.oci_mediatypes is not None:
            attrs["oci-mediatypes"] = _bool(self.oci_mediatypes)
        if self.compression is not None:
            attrs["compression"] = self.compression
        if self.config is not None:
            attrs["containerimage.config"] = self.config.to_json()
        return control_pb2.Exporter(Type="image", Attrs=attrs)


@dataclass(frozen=True)
class Exporter:
    """Any other exporter by its daemon type (`oci`, `tar`, `local`, ...)."""

    type: str
    attrs: Mapping[str, str] = field(default_factory=dict)

    def to_pb(self) -> control_pb2.Exporter:
        return control_pb2.Exporter(Type=self.type, Attrs=dict(self.attrs))


ExportSpec = ImageExport | Exporter


@dataclass(frozen=True)
class RegistryCache:
    """A registry cache ref, usable both as import and as export.

    `mode="max"` also exports intermediate layers; `image_manifest=True` stores
    the cache as an OCI image manifest, which more registries accept than an index.
    """

    ref: str
    mode: str = "max"
    image_manifest: bool = True
    insecure: bool = False
    # True: a failed cache export doesn't fail the build.
    ignore_error: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            # The daemon silently treats unknown modes as min; refuse instead.
            raise ValueError(f"cache mode must be min or max, not {self.mode!r}")

    def export_entry(self) -> control_pb2.CacheOptionsEntry:
        attrs = {
            "ref": self.ref,
            "mode": self.mode,
            "image-manifest": _bool(self.image_manifest),
        }
        if self.insecure:
            attrs["registry.insecure"] = "true"
        if self.ignore_error:
            attrs["ignore-error"] = "true"
        return control_pb2.CacheOptionsEntry(Type="registry", Attrs=attrs)

    def import_entry(self) -> control_pb2.CacheOptionsEntry:
        attrs = {"ref": self.ref}
        if self.insecure:
            attrs["registry.insecure"] = "true"
        return control_pb2.CacheOptionsEntry(Type="registry", Attrs=attrs)


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor from the exporter response."""

    media_type: str
    digest: str
    size: int
    platform: Mapping[str, Any] | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SolveResult:
    """What a finished solve returned: the build ref and the exporter response."""

    ref: str
    exporter_response: Mapping[str, str]

    @property
    def image_digest(self) -> str | None:
        """Digest of the exported/pushed manifest (or index), `sha256:...`."""
        return self.exporter_response.get(RESPONSE_IMAGE_DIGEST)

    @property
    def config_digest(self) -> str | None:
        """Digest of the image config blob (single-platform builds)."""
        return self.exporter_response.get(RESPONSE_CONFIG_DIGEST)

    @property
    def image_names(self) -> list[str]:
        raw = self.exporter_response.get(RESPONSE_IMAGE_NAME, "")
        return [n for n in raw.split(",") if n]

    @property
    def descriptor(self) -> Descriptor | None:
        """The manifest descriptor (the daemon sends it as base64 JSON)."""
        raw = self.exporter_response.get(RESPONSE_DESCRIPTOR)
        if raw is None:
            return None
        try:
            doc = json.loads(base64.b64decode(raw, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"malformed {RESPONSE_DESCRIPTOR}: {raw[:80]!r}") from exc
        return Descriptor(
            media_type=doc["mediaType"],
            digest=doc["digest"],
            size=int(doc["size"]),
            platform=doc.get("platform"),
            annotations=doc.get("annotations") or {},
        )

    @property
    def cache_manifest(self) -> Mapping[str, Any] | None:
        """The cache manifest descriptor of a registry cache export (plain JSON)."""
        raw = self.exporter_response.get(RESPONSE_CACHE_MANIFEST)
        if raw is None:
            return None
        try:
            doc: Mapping[str, Any] = json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"malformed {RESPONSE_CACHE_MANIFEST}: {raw[:80]!r}") from exc
        return doc
