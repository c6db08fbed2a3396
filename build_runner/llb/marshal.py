"""Serialize a State graph into a `pb.Definition` (moby/buildkit `client/llb/marshal.go`).

Owns the byte layout of every op, because the daemon keys ops by the sha256 of
the exact bytes: the same graph must always give the same bytes, and the bytes
should equal what Go's `proto.MarshalOptions{Deterministic: true}` writes so
progress vertices (which carry the daemon's recomputed digests) map back to our
ops. Go writes an `Op`'s oneof after its regular fields (inputs, platform,
constraints); `_serialize_op` does the same. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass, field

from build_runner._pb.buildkit import ops_pb2
from build_runner.llb.ops import (
    BindMount,
    CacheMount,
    Chown,
    Copy,
    DiffOp,
    ExecOp,
    FileOp,
    MergeOp,
    Mkdir,
    Mkfile,
    Mount,
    NetworkMode,
    OpOptions,
    Output,
    Platform,
    Rm,
    SecretMount,
    SecurityMode,
    SourceOp,
    Symlink,
    TmpfsMount,
    Vertex,
)
from build_runner.llb.state import State

# BuildKit's "no input" / "no output" index (solver/pb: Empty, SkipOutput).
EMPTY = -1
# File action timestamps and copy modes use -1 for "don't override"; proto3's
# default 0 would mean 1970-01-01 and chmod 0000 (client/llb/fileop.go).
UNSET = -1
CUSTOM_NAME_KEY = "llb.customname"


@dataclass(frozen=True)
class MarshalledOp:
    """One serialized op: its exact bytes, digest and metadata."""

    data: bytes
    digest: str
    metadata: ops_pb2.OpMetadata


@dataclass
class _Walk:
    platform: Platform | None
    by_vertex: dict[int, MarshalledOp] = field(default_factory=dict)
    order: list[MarshalledOp] = field(default_factory=list)


def op_digest(data: bytes) -> str:
    """The digest BuildKit uses for an op: sha256 of its serialized bytes."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _serialize_op(op: ops_pb2.Op) -> bytes:
    """Regular fields first, then the oneof: the order Go's marshaller writes."""
    which = op.WhichOneof("op")
    if which is None:
        return op.SerializeToString(deterministic=True)
    head = ops_pb2.Op()
    head.CopyFrom(op)
    head.ClearField(which)
    body: bytes = getattr(op, which).SerializeToString(deterministic=True)
    number = ops_pb2.Op.DESCRIPTOR.fields_by_name[which].number
    # Length-delimited wire type (2) for an embedded message.
    return (
        head.SerializeToString(deterministic=True)
        + _varint(number << 3 | 2)
        + _varint(len(body))
        + body
    )


def _clean(path: str) -> str:
    """Go's path.Clean (posixpath.normpath keeps a leading `//`)."""
    cleaned = posixpath.normpath(path)
    if cleaned.startswith("//"):
        cleaned = "/" + cleaned.lstrip("/")
    return cleaned


def _normalize_path(parent: str, path: str, *, keep_slash: bool) -> str:
    """client/llb/fileop.go normalizePath: absolute, cleaned, optional trailing `/` kept."""
    out = _clean(path)
    if not out.startswith("/"):
        out = _clean(posixpath.join("/", parent, out))
    if keep_slash:
        if path.endswith("/") and not out.endswith("/"):
            out += "/"
        elif path.endswith("/."):
            if out != "/":
                out += "/"
            out += "."
    return out


def _metadata(options: OpOptions, caps: set[str]) -> ops_pb2.OpMetadata:
    md = ops_pb2.OpMetadata(ignore_cache=options.ignore_cache)
    description = dict(options.description)
    if options.custom_name is not None:
        description[CUSTOM_NAME_KEY] = options.custom_name
    for key, value in description.items():
        md.description[key] = value
    for cap in caps | options.caps:
        md.caps[cap] = True
    return md


def _platform_pb(platform: Platform) -> ops_pb2.Platform:
    return ops_pb2.Platform(
        OS=platform.os,
        Architecture=platform.architecture,
        Variant=platform.variant,
        OSVersion=platform.os_version,
    )


def _new_op(platform: Platform | None) -> ops_pb2.Op:
    op = ops_pb2.Op()
    if platform is not None:
        op.platform.CopyFrom(_platform_pb(platform))
    # Go always sets an (empty) WorkerConstraints, which still writes its tag.
    op.constraints.SetInParent()
    return op


class _Inputs:
    """An op's input list; equal inputs share one index (client/llb addInput)."""

    def __init__(self, walk: _Walk, op: ops_pb2.Op) -> None:
        self._walk = walk
        self._op = op

    def add(self, output: Output | None, *, dedupe: bool = True) -> int:
        if output is None:
            return EMPTY
        digest = self._walk.by_vertex[id(output.vertex)].digest
        if dedupe:
            for i, existing in enumerate(self._op.inputs):
                if existing.digest == digest and existing.index == output.index:
                    return i
        self._op.inputs.add(digest=digest, index=output.index)
        return len(self._op.inputs) - 1


def _source(v: SourceOp, walk: _Walk) -> tuple[ops_pb2.Op, set[str]]:
    platform = v.platform or walk.platform
    is_image = v.identifier.startswith(("docker-image://", "oci-layout://"))
    op = _new_op(platform if is_image else None)
    op.source.identifier = v.identifier
    for key, value in v.attrs:
        op.source.attrs[key] = value
    return op, set(v.caps)


def _mount(m: Mount, inputs: _Inputs, output: int) -> ops_pb2.Mount:
    if isinstance(m, BindMount):
        pm = ops_pb2.Mount(
            input=inputs.add(m.source),
            dest=m.target,
            output=output,
            readonly=m.readonly,
            selector=m.selector,
        )
    elif isinstance(m, CacheMount):
        pm = ops_pb2.Mount(
            input=inputs.add(m.source), dest=m.target, output=EMPTY, mountType=ops_pb2.CACHE
        )
        pm.cacheOpt.ID = m.id
        pm.cacheOpt.sharing = int(m.sharing)  # type: ignore[assignment]
    elif isinstance(m, TmpfsMount):
        pm = ops_pb2.Mount(input=EMPTY, dest=m.target, output=EMPTY, mountType=ops_pb2.TMPFS)
        pm.TmpfsOpt.size = m.size_bytes
    else:
        # Go leaves `output` unset (0) on secret mounts; the daemon ignores it there.
        pm = ops_pb2.Mount(input=EMPTY, dest=m.target, mountType=ops_pb2.SECRET)
        pm.secretOpt.ID = m.id
        pm.secretOpt.uid = m.uid
        pm.secretOpt.gid = m.gid
        pm.secretOpt.mode = m.mode
        pm.secretOpt.optional = m.optional
    return pm


def _exec(v: ExecOp, walk: _Walk) -> tuple[ops_pb2.Op, set[str]]:
    op = _new_op(v.platform or walk.platform)
    caps = {"exec.meta.base"}
    meta = op.exec.meta
    meta.args.extend(v.args)
    meta.env.extend(v.env)
    meta.cwd = v.cwd
    meta.user = v.user
    meta.hostname = v.hostname
    # Go sets this so empty mount-point stubs don't end up in the committed layer.
    meta.removeMountStubsRecursive = True
    for host in v.extra_hosts:
        meta.extraHosts.add(Host=host.host, IP=host.ip)
    if v.valid_exit_codes is not None:
        meta.validExitCodes.extend(v.valid_exit_codes)
        caps.add("exec.validexitcode")
    op.exec.network = int(v.network)  # type: ignore[assignment]
    op.exec.security = int(v.security)  # type: ignore[assignment]
    if v.network != NetworkMode.SANDBOX:
        caps.add("exec.meta.network")
    if v.security == SecurityMode.INSECURE:
        caps.add("exec.meta.security")
    inputs = _Inputs(walk, op)
    next_output = 0
    for m in v.sorted_mounts:
        output = EMPTY
        if isinstance(m, BindMount) and not m.readonly:
            output = next_output
            next_output += 1
        op.exec.mounts.append(_mount(m, inputs, output))
        if isinstance(m, BindMount) and m.selector:
            caps.add("exec.mount.selector")
        if isinstance(m, CacheMount):
            caps |= {"exec.mount.cache", "exec.mount.cache.sharing"}
        elif isinstance(m, TmpfsMount):
            caps.add("exec.mount.tmpfs")
            if m.size_bytes > 0:
                caps.add("exec.mount.tmpfs.size")
        elif isinstance(m, SecretMount):
            caps.add("exec.mount.secret")
        elif m.source is not None:
            caps.add("exec.mount.bind")
    for se in v.secret_env:
        op.exec.secretenv.add(ID=se.id, name=se.name, optional=se.optional)
        caps |= {"exec.mount.secret", "exec.secretenv"}
    return op, caps


def _user_opt(target: ops_pb2.UserOpt, value: int | str, base: int) -> None:
    if isinstance(value, int):
        target.byID = value
    else:
        target.byName.name = value
        target.byName.input = base


def _owner(target: ops_pb2.ChownOpt, owner: Chown, base: int) -> None:
    _user_opt(target.user, owner.user, base)
    if owner.group is not None:
        _user_opt(target.group, owner.group, base)


def _file(v: FileOp, walk: _Walk) -> tuple[ops_pb2.Op, set[str]]:
    op = _new_op(None)  # FileOp is not platform specific (client/llb/fileop.go)
    caps = {"file.base"}
    inputs = _Inputs(walk, op)
    base = inputs.add(v.base)
    secondaries = [
        inputs.add(kind.source) if isinstance(kind, Copy) else EMPTY for kind in v.actions
    ]
    # Index space: 0..N-1 op inputs, N+i the result of action i (solver/pb/ops.proto).
    n_inputs = len(op.inputs)
    for i, kind in enumerate(v.actions):
        action = op.file.actions.add(
            input=base if i == 0 else n_inputs + i - 1,
            secondaryInput=secondaries[i],
            output=0 if i == len(v.actions) - 1 else EMPTY,
        )
        if isinstance(kind, Mkdir):
            action.mkdir.path = _normalize_path(v.cwd, kind.path, keep_slash=False)
            action.mkdir.mode = kind.mode & 0o777
            action.mkdir.makeParents = kind.make_parents
            if kind.owner is not None:
                _owner(action.mkdir.owner, kind.owner, base)
            action.mkdir.timestamp = UNSET if kind.created_ns is None else kind.created_ns
        elif isinstance(kind, Mkfile):
            action.mkfile.path = _normalize_path(v.cwd, kind.path, keep_slash=False)
            action.mkfile.mode = kind.mode & 0o777
            action.mkfile.data = kind.data
            if kind.owner is not None:
                _owner(action.mkfile.owner, kind.owner, base)
            action.mkfile.timestamp = UNSET if kind.created_ns is None else kind.created_ns
        elif isinstance(kind, Rm):
            action.rm.path = _normalize_path(v.cwd, kind.path, keep_slash=False)
            action.rm.allowNotFound = kind.allow_not_found
            action.rm.allowWildcard = kind.allow_wildcard
        elif isinstance(kind, Symlink):
            action.symlink.oldpath = kind.old_path
            action.symlink.newpath = kind.new_path
            if kind.owner is not None:
                _owner(action.symlink.owner, kind.owner, base)
            action.symlink.timestamp = UNSET if kind.created_ns is None else kind.created_ns
            caps.add("file.symlink.create")
        else:
            _copy(action.copy, kind, v.cwd, base)
            if kind.include_patterns or kind.exclude_patterns:
                caps.add("file.copy.includeexcludepatterns")
            if kind.required_paths:
                caps.add("file.copy.requiredpaths")
            if kind.always_replace_existing_dest_paths:
                caps.add("file.copy.alwaysreplaceexistingdestpaths")
            if kind.mode_str:
                caps.add("file.copy.modestring")
    return op, caps


def _copy(c: ops_pb2.FileActionCopy, kind: Copy, cwd: str, base: int) -> None:
    src = _clean(kind.src)
    if not src.startswith("/"):
        src = _clean(posixpath.join(kind.source_cwd, src))
    c.src = src
    c.dest = _normalize_path(cwd, kind.dest, keep_slash=True)
    if kind.owner is not None:
        _owner(c.owner, kind.owner, base)
    c.include_patterns.extend(kind.include_patterns)
    c.exclude_patterns.extend(kind.exclude_patterns)
    c.required_paths.extend(kind.required_paths)
    c.allowWildcard = kind.allow_wildcard
    c.allowEmptyWildcard = kind.allow_empty_wildcard
    c.followSymlink = kind.follow_symlinks
    c.dirCopyContents = kind.dir_copy_contents
    c.attemptUnpackDockerCompatibility = kind.attempt_unpack
    c.createDestPath = kind.create_dest_path
    c.timestamp = UNSET if kind.created_ns is None else kind.created_ns
    c.alwaysReplaceExistingDestPaths = kind.always_replace_existing_dest_paths
    # A mode string replaces the numeric mode, which Go then leaves at 0.
    if kind.mode_str:
        c.modeStr = kind.mode_str
    else:
        c.mode = UNSET if kind.mode is None else kind.mode


def _merge(v: MergeOp, walk: _Walk) -> tuple[ops_pb2.Op, set[str]]:
    op = _new_op(None)
    inputs = _Inputs(walk, op)
    for layer in v.layers:
        # client/llb/merge.go gives every layer its own input, even repeated ones.
        op.merge.inputs.add(input=inputs.add(layer, dedupe=False))
    return op, {"mergeop"}


def _diff(v: DiffOp, walk: _Walk) -> tuple[ops_pb2.Op, set[str]]:
    op = _new_op(None)
    inputs = _Inputs(walk, op)
    op.diff.lower.input = inputs.add(v.lower, dedupe=False)
    op.diff.upper.input = inputs.add(v.upper, dedupe=False)
    return op, {"diffop"}


def _marshal_vertex(v: Vertex, walk: _Walk) -> MarshalledOp:
    if isinstance(v, SourceOp):
        op, caps = _source(v, walk)
    elif isinstance(v, ExecOp):
        op, caps = _exec(v, walk)
    elif isinstance(v, FileOp):
        op, caps = _file(v, walk)
    elif isinstance(v, MergeOp):
        op, caps = _merge(v, walk)
    else:
        op, caps = _diff(v, walk)
    data = _serialize_op(op)
    return MarshalledOp(data=data, digest=op_digest(data), metadata=_metadata(v.options, caps))


def _walk_graph(root: Vertex, walk: _Walk) -> None:
    """Post-order walk without recursion, so long chains don't hit Python's stack limit."""
    stack: list[tuple[Vertex, bool]] = [(root, False)]
    while stack:
        v, expanded = stack.pop()
        if id(v) in walk.by_vertex:
            continue
        if expanded:
            done = _marshal_vertex(v, walk)
            walk.by_vertex[id(v)] = done
            walk.order.append(done)
            continue
        stack.append((v, True))
        for child in reversed([out.vertex for out in v.inputs]):
            if id(child) not in walk.by_vertex:
                stack.append((child, False))


def marshal(state: State, *, platform: Platform | None = None) -> ops_pb2.Definition:
    """Serialize the graph ending at `state` into a Definition, dependencies first.

    `platform` fills exec and image ops that have none (the daemon would use its
    worker default). Scratch gives an empty Definition.
    """
    definition = ops_pb2.Definition()
    if state.output is None:
        return definition
    walk = _Walk(platform=platform)
    _walk_graph(state.output.vertex, walk)
    seen: set[str] = set()
    for done in walk.order:
        existing = definition.metadata.get(done.digest)
        if existing is not None:
            # Identical ops collapse to one vertex; keep the union of their metadata.
            existing.MergeFrom(done.metadata)
        else:
            definition.metadata[done.digest].CopyFrom(done.metadata)
        if done.digest not in seen:
            seen.add(done.digest)
            getattr(definition, "def").append(done.data)
    terminal = ops_pb2.Op()
    terminal.inputs.add(
        digest=walk.by_vertex[id(state.output.vertex)].digest, index=state.output.index
    )
    data = terminal.SerializeToString(deterministic=True)
    md = definition.metadata[op_digest(data)]
    md.caps["constraints"] = True
    md.caps["platform"] = True
    for digest, other in definition.metadata.items():
        if digest == op_digest(data):
            continue
        if other.ignore_cache:
            md.caps["meta.ignorecache"] = True
        if other.description:
            md.caps["meta.description"] = True
        if other.HasField("export_cache"):
            md.caps["meta.exportcache"] = True
    getattr(definition, "def").append(data)
    return definition
