"""The LLB vertex model: immutable op descriptions that `marshal.py` turns into `pb.Op`.

Owns the plain data of each op kind (source, exec, file, merge, diff) and their
options, mirroring moby/buildkit `client/llb/{source,exec,fileop,merge,diff}.go`.
No protobuf, no I/O: building these objects never fails on a daemon.

Vertices compare by identity (`eq=False`): the graph is walked by object, which
keeps hashing O(1) on deep chains; equal content still marshals to equal bytes
and so to the same digest.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True)
class Platform:
    """An OCI platform (image-spec `Platform`)."""

    os: str
    architecture: str
    variant: str = ""
    os_version: str = ""

    @classmethod
    def parse(cls, spec: str) -> Platform:
        """Parse `os/arch[/variant]`, e.g. `linux/amd64` or `linux/arm64/v8`."""
        parts = spec.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"invalid platform {spec!r}: want os/arch[/variant]")
        return cls(os=parts[0], architecture=parts[1], variant=parts[2] if len(parts) == 3 else "")

    def __str__(self) -> str:
        base = f"{self.os}/{self.architecture}"
        return f"{base}/{self.variant}" if self.variant else base


class NetworkMode(enum.IntEnum):
    """`pb.NetMode`: SANDBOX is BuildKit's UNSET (the default container network)."""

    SANDBOX = 0
    HOST = 1
    NONE = 2


class SecurityMode(enum.IntEnum):
    """`pb.SecurityMode`."""

    SANDBOX = 0
    INSECURE = 1


class CacheSharing(enum.IntEnum):
    """`pb.CacheSharingOpt`: how concurrent builds share one cache mount."""

    SHARED = 0
    PRIVATE = 1
    LOCKED = 2


@dataclass(frozen=True)
class OpOptions:
    """Per-op metadata kept outside the op bytes (`pb.OpMetadata`)."""

    custom_name: str | None = None
    ignore_cache: bool = False
    description: tuple[tuple[str, str], ...] = ()
    # Extra caps the caller wants declared; marshal adds the ones each op needs.
    caps: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Output:
    """One output of a vertex: what a `pb.Input` points at."""

    vertex: Vertex
    index: int = 0


# --- sources -----------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SourceOp:
    """`pb.SourceOp`: identifier + attrs (docker-image://, local://, git://...)."""

    identifier: str
    attrs: tuple[tuple[str, str], ...]
    caps: frozenset[str]
    platform: Platform | None
    options: OpOptions

    @property
    def inputs(self) -> tuple[Output, ...]:
        return ()


# --- exec --------------------------------------------------------------------


@dataclass(frozen=True)
class BindMount:
    """Mount another state's output (a sub-path with `selector`) at `target`."""

    target: str
    source: Output | None
    selector: str = ""
    readonly: bool = False


@dataclass(frozen=True)
class CacheMount:
    """A persistent cache directory keyed by `id`, never part of the result."""

    target: str
    id: str
    sharing: CacheSharing = CacheSharing.SHARED
    # The cache starts from this state's content when first created (scratch if None).
    source: Output | None = None


@dataclass(frozen=True)
class TmpfsMount:
    """An in-memory mount; `size_bytes` 0 = the daemon's default."""

    target: str
    size_bytes: int = 0


@dataclass(frozen=True)
class SecretMount:
    """A file whose content the daemon fetches through the session `Secrets` service."""

    target: str
    id: str
    uid: int = 0
    gid: int = 0
    mode: int = 0o400
    optional: bool = False


@dataclass(frozen=True)
class SecretEnv:
    """An environment variable whose value comes from the session `Secrets` service."""

    id: str
    name: str
    optional: bool = False


Mount = BindMount | CacheMount | TmpfsMount | SecretMount


@dataclass(frozen=True)
class HostIP:
    """An /etc/hosts entry for the exec container."""

    host: str
    ip: str


@dataclass(frozen=True, eq=False)
class ExecOp:
    """`pb.ExecOp`. `mounts` holds the root mount (`/`) and the extra ones, unsorted."""

    args: tuple[str, ...]
    env: tuple[str, ...]
    cwd: str
    user: str
    mounts: tuple[Mount, ...]
    network: NetworkMode
    security: SecurityMode
    secret_env: tuple[SecretEnv, ...]
    hostname: str
    extra_hosts: tuple[HostIP, ...]
    valid_exit_codes: tuple[int, ...] | None
    platform: Platform | None
    options: OpOptions

    @property
    def sorted_mounts(self) -> tuple[Mount, ...]:
        """Mounts in marshal order: client/llb/exec.go sorts by target, secrets last."""
        regular = sorted(
            (m for m in self.mounts if not isinstance(m, SecretMount)), key=lambda m: m.target
        )
        secrets = [m for m in self.mounts if isinstance(m, SecretMount)]
        return (*regular, *secrets)

    def output_index(self, target: str) -> int | None:
        """The result index of the mount at `target`, or None if it has no output.

        Results are numbered in sorted mount order, skipping readonly, cache,
        tmpfs and secret mounts (client/llb/exec.go); `/` is therefore 0.
        """
        index = 0
        for m in self.sorted_mounts:
            has_output = isinstance(m, BindMount) and not m.readonly
            if m.target == target:
                return index if has_output else None
            if has_output:
                index += 1
        raise KeyError(f"no mount at {target!r}")

    @property
    def inputs(self) -> tuple[Output, ...]:
        seen: list[Output] = []
        for m in self.sorted_mounts:
            src = m.source if isinstance(m, BindMount | CacheMount) else None
            if src is not None and src not in seen:
                seen.append(src)
        return tuple(seen)


# --- file --------------------------------------------------------------------


@dataclass(frozen=True)
class Chown:
    """Owner for created/copied files: numeric ids or names resolved in the target's /etc."""

    user: int | str
    group: int | str | None = None


@dataclass(frozen=True)
class Mkdir:
    path: str
    mode: int = 0o755
    make_parents: bool = False
    owner: Chown | None = None
    created_ns: int | None = None


@dataclass(frozen=True)
class Mkfile:
    path: str
    mode: int = 0o644
    data: bytes = b""
    owner: Chown | None = None
    created_ns: int | None = None


@dataclass(frozen=True)
class Rm:
    path: str
    allow_not_found: bool = False
    allow_wildcard: bool = False


@dataclass(frozen=True)
class Symlink:
    old_path: str
    new_path: str
    owner: Chown | None = None
    created_ns: int | None = None


@dataclass(frozen=True)
class Copy:
    """Copy `src` from `source` (None = scratch) to `dest` in the state being changed."""

    source: Output | None
    # The source state's working dir, used to resolve a relative `src`.
    source_cwd: str
    src: str
    dest: str
    owner: Chown | None = None
    mode: int | None = None
    mode_str: str = ""
    follow_symlinks: bool = False
    dir_copy_contents: bool = False
    attempt_unpack: bool = False
    create_dest_path: bool = False
    allow_wildcard: bool = False
    allow_empty_wildcard: bool = False
    created_ns: int | None = None
    include_patterns: tuple[str, ...] = ()
    exclude_patterns: tuple[str, ...] = ()
    required_paths: tuple[str, ...] = ()
    always_replace_existing_dest_paths: bool = False


FileActionKind = Mkdir | Mkfile | Rm | Symlink | Copy


@dataclass(frozen=True, eq=False)
class FileOp:
    """`pb.FileOp`: `actions` run in order on `base` (None = scratch)."""

    base: Output | None
    # The base state's working dir, used to resolve relative paths of the actions.
    cwd: str
    actions: tuple[FileActionKind, ...]
    options: OpOptions

    @property
    def inputs(self) -> tuple[Output, ...]:
        seen: list[Output] = []
        if self.base is not None:
            seen.append(self.base)
        for kind in self.actions:
            if isinstance(kind, Copy) and kind.source is not None and kind.source not in seen:
                seen.append(kind.source)
        return tuple(seen)


# --- merge / diff ------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class MergeOp:
    """`pb.MergeOp`: layers stacked in order, later wins."""

    layers: tuple[Output, ...]
    options: OpOptions

    @property
    def inputs(self) -> tuple[Output, ...]:
        return self.layers


@dataclass(frozen=True, eq=False)
class DiffOp:
    """`pb.DiffOp`: the changes from `lower` to `upper` (None = scratch)."""

    lower: Output | None
    upper: Output | None
    options: OpOptions

    @property
    def inputs(self) -> tuple[Output, ...]:
        return tuple(o for o in (self.lower, self.upper) if o is not None)


Vertex = SourceOp | ExecOp | FileOp | MergeOp | DiffOp

__all__ = [
    "BindMount",
    "CacheMount",
    "CacheSharing",
    "Chown",
    "Copy",
    "DiffOp",
    "ExecOp",
    "FileActionKind",
    "FileOp",
    "HostIP",
    "MergeOp",
    "Mkdir",
    "Mkfile",
    "Mount",
    "NetworkMode",
    "OpOptions",
    "Output",
    "Platform",
    "Rm",
    "SecretEnv",
    "SecretMount",
    "SecurityMode",
    "SourceOp",
    "Symlink",
    "TmpfsMount",
    "Vertex",
]
