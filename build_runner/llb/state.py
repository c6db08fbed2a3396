"""The immutable State API for building LLB graphs (moby/buildkit `client/llb/state.go`).

A `State` is a frozen value: an output of some vertex (or scratch) plus the
process context later exec ops inherit (env, working dir, user, platform,
network, security). Every method returns a new state; nothing is serialized
until `marshal.marshal()` walks the graph. No I/O and no grpc here.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from build_runner.llb.ops import (
    BindMount,
    CacheMount,
    Chown,
    Copy,
    DiffOp,
    ExecOp,
    FileActionKind,
    FileOp,
    HostIP,
    MergeOp,
    Mkdir,
    Mkfile,
    Mount,
    NetworkMode,
    OpOptions,
    Output,
    Platform,
    Rm,
    SecretEnv,
    SecretMount,
    SecurityMode,
    SourceOp,
    Symlink,
    TmpfsMount,
)

# Default secret names BuildKit's git source asks the session for (client/llb/source.go).
GIT_AUTH_TOKEN_SECRET = "GIT_AUTH_TOKEN"
GIT_AUTH_HEADER_SECRET = "GIT_AUTH_HEADER"


def _options(name: str | None, ignore_cache: bool) -> OpOptions:
    return OpOptions(custom_name=name, ignore_cache=ignore_cache)


def _join_dir(cwd: str, path: str) -> str:
    """Resolve `path` against `cwd` the way client/llb/meta.go's Dir does."""
    if posixpath.isabs(path):
        return posixpath.normpath(path)
    return posixpath.normpath(posixpath.join("/", cwd, path))


@dataclass(frozen=True)
class State:
    """A point in the build graph plus the context exec ops inherit."""

    output: Output | None = None
    env: tuple[tuple[str, str], ...] = ()
    cwd: str = "/"
    user_name: str = ""
    platform: Platform | None = None
    network_mode: NetworkMode = NetworkMode.SANDBOX
    security_mode: SecurityMode = SecurityMode.SANDBOX

    # --- context ---------------------------------------------------------

    def add_env(self, key: str, value: str) -> State:
        """Set an environment variable (replacing an earlier value in place)."""
        if not key or "=" in key:
            raise ValueError(f"invalid environment variable name {key!r}")
        if any(k == key for k, _ in self.env):
            pairs = tuple((k, value if k == key else v) for k, v in self.env)
        else:
            pairs = (*self.env, (key, value))
        return dataclasses.replace(self, env=pairs)

    def get_env(self, key: str) -> str | None:
        """The value of an environment variable, or None."""
        return next((v for k, v in self.env if k == key), None)

    def dir(self, path: str) -> State:
        """Change the working dir; a relative path is joined to the current one."""
        return dataclasses.replace(self, cwd=_join_dir(self.cwd, path))

    def user(self, user: str) -> State:
        """Set the user later exec ops run as (`uid[:gid]` or a name in the rootfs)."""
        return dataclasses.replace(self, user_name=user)

    def with_platform(self, platform: Platform) -> State:
        """Set the platform used by exec ops built on this state."""
        return dataclasses.replace(self, platform=platform)

    def network(self, mode: NetworkMode) -> State:
        """Set the network mode of later exec ops (HOST needs the network.host entitlement)."""
        return dataclasses.replace(self, network_mode=mode)

    def security(self, mode: SecurityMode) -> State:
        """Set the security mode of later exec ops (INSECURE needs security.insecure)."""
        return dataclasses.replace(self, security_mode=mode)

    # --- ops -------------------------------------------------------------

    def run(
        self,
        args: str | Sequence[str],
        *,
        mounts: Sequence[Mount] = (),
        secret_env: Sequence[SecretEnv] = (),
        readonly_rootfs: bool = False,
        hostname: str = "",
        extra_hosts: Mapping[str, str] | None = None,
        valid_exit_codes: Sequence[int] | None = None,
        name: str | None = None,
        ignore_cache: bool = False,
    ) -> ExecState:
        """Run a process with this state as its root filesystem.

        A string is run with `/bin/sh -c`, like a Dockerfile RUN in shell form.
        """
        argv = ("/bin/sh", "-c", args) if isinstance(args, str) else tuple(args)
        if not argv:
            raise ValueError("run needs at least one argument")
        targets = [m.target for m in mounts]
        if "/" in targets:
            raise ValueError("the root mount comes from the state itself; don't pass one")
        if len(set(targets)) != len(targets):
            raise ValueError(f"duplicate mount targets in {targets}")
        for target in targets:
            if not posixpath.isabs(target):
                raise ValueError(f"mount target {target!r} must be absolute")
        root = BindMount(target="/", source=self.output, readonly=readonly_rootfs)
        op = ExecOp(
            args=argv,
            env=tuple(f"{k}={v}" for k, v in self.env),
            cwd=self.cwd,
            user=self.user_name,
            mounts=(root, *mounts),
            network=self.network_mode,
            security=self.security_mode,
            secret_env=tuple(secret_env),
            hostname=hostname,
            extra_hosts=tuple(HostIP(h, ip) for h, ip in sorted((extra_hosts or {}).items())),
            valid_exit_codes=tuple(valid_exit_codes) if valid_exit_codes is not None else None,
            platform=self.platform,
            options=_options(name, ignore_cache),
        )
        index = op.output_index("/")
        output = Output(op, index) if index is not None else None
        return ExecState(
            output=output,
            env=self.env,
            cwd=self.cwd,
            user_name=self.user_name,
            platform=self.platform,
            network_mode=self.network_mode,
            security_mode=self.security_mode,
            exec_op=op,
        )

    def file(
        self, action: FileAction, *, name: str | None = None, ignore_cache: bool = False
    ) -> State:
        """Apply a chain of file actions (one FileOp) to this state."""
        op = FileOp(
            base=self.output,
            cwd=self.cwd,
            actions=action.chain(),
            options=_options(name, ignore_cache),
        )
        return dataclasses.replace(self, output=Output(op, 0))


@dataclass(frozen=True)
class ExecState(State):
    """The root filesystem after a `run()`, plus access to its other mounts' results."""

    exec_op: ExecOp | None = None

    def get_mount(self, target: str) -> State:
        """The content of the (writable bind) mount at `target` after the process ran."""
        if self.exec_op is None:
            raise ValueError("not the result of run()")
        index = self.exec_op.output_index(target)
        if index is None:
            raise ValueError(f"mount {target!r} is readonly, cache, tmpfs or secret: no result")
        return State(output=Output(self.exec_op, index), platform=self.platform)


# --- file actions --------------------------------------------------------------


@dataclass(frozen=True)
class FileAction:
    """A chain of file actions; each one applies to the result of the one before.

    Build with the module functions (`mkdir`, `mkfile`, `rm`, `symlink`, `copy`),
    chain with `then()`, and pass the chain to `State.file()`; it becomes one FileOp.
    """

    kind: FileActionKind
    prev: FileAction | None = None

    def chain(self) -> tuple[FileActionKind, ...]:
        """All actions, first to last."""
        out: list[FileActionKind] = []
        node: FileAction | None = self
        while node is not None:
            out.append(node.kind)
            node = node.prev
        return tuple(reversed(out))

    def then(self, nxt: FileAction) -> FileAction:
        """Append the actions of `nxt` so they run on this chain's result."""
        out = self
        for kind in nxt.chain():
            out = FileAction(kind, out)
        return out


def mkdir(
    path: str,
    mode: int = 0o755,
    *,
    make_parents: bool = False,
    owner: Chown | None = None,
    created_ns: int | None = None,
) -> FileAction:
    """Create a directory (`mode` is used as given; None timestamp keeps "now")."""
    return FileAction(Mkdir(path, mode, make_parents, owner, created_ns))


def mkfile(
    path: str,
    mode: int,
    data: bytes,
    *,
    owner: Chown | None = None,
    created_ns: int | None = None,
) -> FileAction:
    """Create a file with `data`."""
    return FileAction(Mkfile(path, mode, data, owner, created_ns))


def rm(path: str, *, allow_not_found: bool = False, allow_wildcard: bool = False) -> FileAction:
    """Remove a file or directory."""
    return FileAction(Rm(path, allow_not_found, allow_wildcard))


def symlink(
    old_path: str, new_path: str, *, owner: Chown | None = None, created_ns: int | None = None
) -> FileAction:
    """Create a symlink at `new_path` pointing to `old_path`."""
    return FileAction(Symlink(old_path, new_path, owner, created_ns))


def copy(
    source: State,
    src: str,
    dest: str,
    *,
    owner: Chown | None = None,
    mode: int | None = None,
    mode_str: str = "",
    follow_symlinks: bool = False,
    dir_copy_contents: bool = False,
    attempt_unpack: bool = False,
    create_dest_path: bool = False,
    allow_wildcard: bool = False,
    allow_empty_wildcard: bool = False,
    created_ns: int | None = None,
    include_patterns: Sequence[str] = (),
    exclude_patterns: Sequence[str] = (),
    required_paths: Sequence[str] = (),
    always_replace_existing_dest_paths: bool = False,
) -> FileAction:
    """Copy `src` of `source` to `dest`; a trailing `/` on dest copies into a directory.

    `mode` None keeps the source mode (marshalled as -1, BuildKit's sentinel);
    `mode_str` takes a chmod-style string such as `u+x` instead.
    """
    if mode is not None and mode_str:
        raise ValueError("give mode or mode_str, not both")
    return FileAction(
        Copy(
            source=source.output,
            source_cwd=source.cwd,
            src=src,
            dest=dest,
            owner=owner,
            mode=mode,
            mode_str=mode_str,
            follow_symlinks=follow_symlinks,
            dir_copy_contents=dir_copy_contents,
            attempt_unpack=attempt_unpack,
            create_dest_path=create_dest_path,
            allow_wildcard=allow_wildcard,
            allow_empty_wildcard=allow_empty_wildcard,
            created_ns=created_ns,
            include_patterns=tuple(include_patterns),
            exclude_patterns=tuple(exclude_patterns),
            required_paths=tuple(required_paths),
            always_replace_existing_dest_paths=always_replace_existing_dest_paths,
        )
    )


# --- sources -------------------------------------------------------------------


def scratch() -> State:
    """The empty filesystem."""
    return State()


def normalize_image_ref(ref: str) -> str:
    """Qualify a reference the way docker's reference.ParseNormalizedNamed does.

    The daemon requires a host and a tag or digest: `alpine` becomes
    `docker.io/library/alpine:latest`, `127.0.0.1:5000/x` becomes `...:latest`.
    """
    if not ref or ref != ref.strip() or "://" in ref:
        raise ValueError(f"invalid image reference {ref!r}")
    name, at, digest = ref.partition("@")
    first, slash, rest = name.partition("/")
    if not slash or ("." not in first and ":" not in first and first != "localhost"):
        first, rest = "docker.io", name
    if first == "docker.io" and "/" not in rest:
        rest = f"library/{rest}"
    has_tag = ":" in rest.rsplit("/", 1)[-1]
    repository, colon, tag = rest.rpartition(":") if has_tag else (rest, "", "")
    if not repository or repository != repository.lower() or (colon and not tag):
        raise ValueError(f"invalid image reference {ref!r}")
    if not at and not colon:
        colon, tag = ":", "latest"
    out = f"{first}/{repository}{colon}{tag}"
    return f"{out}@{digest}" if at else out


def image(
    ref: str,
    *,
    platform: Platform | None = None,
    resolve_mode: str | None = None,
    name: str | None = None,
    ignore_cache: bool = False,
) -> State:
    """A registry image (`docker-image://`); `resolve_mode` is default, pull or local.

    The image config is not fetched: set env, working dir and user from it
    yourself (`add_env`, `dir`, `user`).
    """
    attrs: dict[str, str] = {}
    caps = {"source.image"}
    if resolve_mode is not None:
        if resolve_mode not in ("default", "pull", "local"):
            raise ValueError(f"invalid resolve mode {resolve_mode!r}")
        attrs["image.resolvemode"] = resolve_mode
        if resolve_mode == "pull":
            caps.add("source.image.resolvemode")
    op = SourceOp(
        identifier=f"docker-image://{normalize_image_ref(ref)}",
        attrs=tuple(sorted(attrs.items())),
        caps=frozenset(caps),
        platform=platform,
        options=_options(name, ignore_cache),
    )
    return State(output=Output(op, 0), platform=platform)


def _json_list(values: Sequence[str]) -> str:
    # Go's json.Marshal: compact, UTF-8 kept, and <, >, & escaped.
    text = json.dumps(list(values), separators=(",", ":"), ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def local(
    name: str,
    *,
    include_patterns: Sequence[str] = (),
    exclude_patterns: Sequence[str] = (),
    follow_paths: Sequence[str] = (),
    shared_key_hint: str = "",
    session_id: str = "",
    unique_id: str = "",
    differ: str = "",
    custom_name: str | None = None,
    ignore_cache: bool = False,
) -> State:
    """A directory the client serves over the session's FileSync (`local://<name>`).

    Without `session_id` any session of the solve serves it, and `unique_id` is
    written as `local.unique` (Go writes a random id) so identical local ops of
    different clients never merge; pass something stable (e.g. the build id)
    to keep the definition deterministic.
    """
    if not name:
        raise ValueError("local source needs a name")
    attrs: dict[str, str] = {}
    caps = {"source.local"}
    if session_id:
        attrs["local.session"] = session_id
        caps.add("source.local.sessionid")
    else:
        attrs["local.unique"] = unique_id
        caps.add("source.local.unique")
    if include_patterns:
        attrs["local.includepattern"] = _json_list(include_patterns)
        caps.add("source.local.includepatterns")
    if follow_paths:
        attrs["local.followpaths"] = _json_list(follow_paths)
        caps.add("source.local.followpaths")
    if exclude_patterns:
        attrs["local.excludepatterns"] = _json_list(exclude_patterns)
        caps.add("source.local.excludepatterns")
    if shared_key_hint:
        attrs["local.sharedkeyhint"] = shared_key_hint
        caps.add("source.local.sharedkeyhint")
    if differ:
        if differ not in ("metadata", "none"):
            raise ValueError(f"invalid differ {differ!r}")
        attrs["local.differ"] = differ
    op = SourceOp(
        identifier=f"local://{name}",
        attrs=tuple(sorted(attrs.items())),
        caps=frozenset(caps),
        platform=None,
        options=_options(custom_name, ignore_cache),
    )
    return State(output=Output(op, 0))


def git(
    url: str,
    ref: str = "",
    *,
    subdir: str = "",
    keep_git_dir: bool = False,
    auth_token_secret: str = GIT_AUTH_TOKEN_SECRET,
    auth_header_secret: str = GIT_AUTH_HEADER_SECRET,
    checksum: str = "",
    name: str | None = None,
    ignore_cache: bool = False,
) -> State:
    """A git repository the daemon clones itself (`git://host/path#ref[:subdir]`).

    Supports https://, http:// and git:// URLs; the daemon needs network access.
    """
    if "://" not in url:
        url = "https://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http", "git") or not parts.hostname:
        raise ValueError(f"unsupported git URL {url!r}")
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    identifier = host + posixpath.normpath(posixpath.join("/", parts.path or "/"))
    sub = posixpath.normpath(posixpath.join("/", subdir)).lstrip("/") if subdir else ""
    if ref or sub:
        identifier += "#" + ref + (f":{sub}" if sub else "")
    attrs: dict[str, str] = {"git.fullurl": url}
    caps = {"source.git", "source.git.fullurl"}
    if keep_git_dir:
        attrs["git.keepgitdir"] = "true"
        caps.add("source.git.keepgitdir")
    if auth_token_secret:
        attrs["git.authtokensecret"] = auth_token_secret
    if auth_header_secret:
        attrs["git.authheadersecret"] = auth_header_secret
    if checksum:
        attrs["git.checksum"] = checksum
        caps.add("source.git.checksum")
    op = SourceOp(
        identifier=f"git://{identifier}",
        attrs=tuple(sorted(attrs.items())),
        caps=frozenset(caps),
        platform=None,
        options=_options(name, ignore_cache),
    )
    return State(output=Output(op, 0))


def http(
    url: str,
    *,
    filename: str = "",
    perm: int = 0,
    uid: int = 0,
    gid: int = 0,
    checksum: str = "",
    name: str | None = None,
    ignore_cache: bool = False,
) -> State:
    """A single file the daemon downloads itself (`https://` or `http://`).

    The result holds one file, `/<filename>` (default: the URL's last path part).
    `perm` 0 keeps the daemon's default (0600); `checksum` is a `sha256:` digest.
    """
    if not url.startswith(("https://", "http://")):
        raise ValueError(f"http source needs an http(s) URL, not {url!r}")
    attrs: dict[str, str] = {}
    caps = {"source.http"}
    if checksum:
        attrs["http.checksum"] = checksum
        caps.add("source.http.checksum")
    if filename:
        attrs["http.filename"] = filename
    if perm:
        attrs["http.perm"] = "0" + format(perm, "o")
        caps.add("source.http.perm")
    if uid or gid:
        # BuildKit's cap id really is spelled "soruce" (solver/pb/caps.go).
        caps.add("soruce.http.uidgid")
    if uid:
        attrs["http.uid"] = str(uid)
    if gid:
        attrs["http.gid"] = str(gid)
    op = SourceOp(
        identifier=url,
        attrs=tuple(sorted(attrs.items())),
        caps=frozenset(caps),
        platform=None,
        options=_options(name, ignore_cache),
    )
    return State(output=Output(op, 0))


def merge(states: Sequence[State], *, name: str | None = None, ignore_cache: bool = False) -> State:
    """Stack the states' filesystems in order (later wins), as one MergeOp.

    Scratch inputs add nothing and are dropped; with fewer than two left no op is
    needed (client/llb/merge.go does the same).
    """
    layers = [s for s in states if s.output is not None]
    if not layers:
        return scratch()
    if len(layers) == 1:
        return layers[0]
    op = MergeOp(
        layers=tuple(s.output for s in layers if s.output is not None),
        options=_options(name, ignore_cache),
    )
    return dataclasses.replace(layers[0], output=Output(op, 0))


def diff(
    lower: State, upper: State, *, name: str | None = None, ignore_cache: bool = False
) -> State:
    """The changes that turn `lower` into `upper`, as one DiffOp."""
    if lower.output is None and upper.output is None:
        return scratch()
    op = DiffOp(lower=lower.output, upper=upper.output, options=_options(name, ignore_cache))
    return dataclasses.replace(upper, output=Output(op, 0))


__all__ = [
    "BindMount",
    "CacheMount",
    "ExecState",
    "FileAction",
    "SecretMount",
    "State",
    "TmpfsMount",
    "copy",
    "diff",
    "git",
    "http",
    "image",
    "local",
    "merge",
    "mkdir",
    "mkfile",
    "normalize_image_ref",
    "rm",
    "scratch",
    "symlink",
]
