"""The sending side of BuildKit's file sync (DiffCopy), with no network I/O.

Owns three things: dockerignore-style pattern matching (moby/patternmatcher's
rules), the walk of a local directory into fsutil `Stat` entries in the order
the daemon's validator demands (tonistiigi/fsutil `filter.go`, `stat.go`,
`validator.go`), and `FileSender`, a state machine for the packet protocol of
fsutil's `send.go`: packets go in, packets to send and file reads come out
(h11's pattern). It never touches gRPC, sockets or threads; the walk reads the
file system's metadata only, file contents are read by the caller.

Decisions where fsutil leaves a choice:
- hard links are sent as fsutil does: the first kept occurrence as a regular
  file, later ones as regular-mode entries with `linkname` = first path, size 0;
- sockets, FIFOs and device nodes are skipped (a build context has no use for
  them and recreating devices needs privileges the daemon may lack);
- xattrs are not sent;
- names and symlink targets go on the wire as the raw bytes the file system
  holds, so names that are not UTF-8 arrive intact, as with the Go client
  (our stat.proto declares them `bytes`). In Python they are `str` with
  surrogate escapes (os.fsdecode), which patterns and sorting handle.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import re
import stat
from collections.abc import Iterable, Sequence

from build_runner._pb.buildkit.fsutil import stat_pb2, wire_pb2

# Go os.FileMode bits (Go's io/fs FileMode constants); the daemon reads
# Stat.mode as a Go FileMode, not as POSIX st_mode.
MODE_DIR = 1 << 31
MODE_SYMLINK = 1 << 27
MODE_DEVICE = 1 << 26
MODE_NAMED_PIPE = 1 << 25
MODE_SOCKET = 1 << 24
MODE_SETUID = 1 << 23
MODE_SETGID = 1 << 22
MODE_CHAR_DEVICE = 1 << 21
MODE_STICKY = 1 << 20
MODE_IRREGULAR = 1 << 19
MODE_TYPE = (
    MODE_DIR
    | MODE_SYMLINK
    | MODE_NAMED_PIPE
    | MODE_SOCKET
    | MODE_DEVICE
    | MODE_CHAR_DEVICE
    | MODE_IRREGULAR
)

PACKET_STAT = wire_pb2.Packet.PACKET_STAT
PACKET_REQ = wire_pb2.Packet.PACKET_REQ
PACKET_DATA = wire_pb2.Packet.PACKET_DATA
PACKET_FIN = wire_pb2.Packet.PACKET_FIN
PACKET_ERR = wire_pb2.Packet.PACKET_ERR


class FileSyncError(Exception):
    """Base of the errors of this module."""


class PatternError(FileSyncError):
    """An include/exclude pattern is malformed."""


class WalkError(FileSyncError):
    """The directory can't be walked or holds an entry we can't send."""


class LocalProtocolError(FileSyncError):
    """Our side tried to do something the protocol forbids (a bug in the caller)."""


class RemoteProtocolError(FileSyncError):
    """The receiver sent something the protocol forbids."""


class ReceiverError(FileSyncError):
    """The receiver aborted the transfer with an ERR packet."""


# --- patterns (moby/patternmatcher patternmatcher.go) -------------------------


def clean_path(path: str) -> str:
    """Go's `filepath.Clean` on a "/"-separated path (posixpath.normpath differs on "//")."""
    if path == "":
        return "."
    rooted = path.startswith("/")
    parts: list[str] = []
    for comp in path.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if parts and parts[-1] != "..":
                parts.pop()
            elif not rooted:
                parts.append("..")
            continue
        parts.append(comp)
    joined = "/".join(parts)
    if rooted:
        return "/" + joined
    return joined or "."


# Characters patternmatcher escapes because they are regexp syntax but not glob
# syntax; everything else is copied into the regexp as is.
_REGEX_ESCAPE = frozenset(".+()|{}$")


class _MatchType(enum.Enum):
    EXACT = enum.auto()
    PREFIX = enum.auto()
    SUFFIX = enum.auto()
    REGEXP = enum.auto()


@dataclasses.dataclass(frozen=True, slots=True)
class Pattern:
    """One compiled dockerignore pattern."""

    text: str
    """The cleaned pattern without its leading "!"."""
    exclusion: bool
    match_type: _MatchType
    regexp: re.Pattern[str] | None

    @classmethod
    def compile(cls, raw: str) -> Pattern | None:
        """Compile one pattern as patternmatcher.New does; None for a blank one."""
        text = raw.strip()
        if not text:
            return None
        text = clean_path(text)
        exclusion = False
        if text.startswith("!"):
            if len(text) == 1:
                raise PatternError('illegal exclusion pattern: "!"')
            exclusion = True
            text = text[1:]
        match_type, regex = _translate(text)
        compiled: re.Pattern[str] | None = None
        if match_type is _MatchType.REGEXP:
            try:
                compiled = re.compile(regex)
            except re.error as exc:
                raise PatternError(f"invalid pattern {raw!r}: {exc}") from exc
        return cls(text=text, exclusion=exclusion, match_type=match_type, regexp=compiled)

    def matches(self, path: str) -> bool:
        """Whether `path` (cleaned, "/"-separated, relative) matches this pattern."""
        if self.match_type is _MatchType.EXACT:
            return path == self.text
        if self.match_type is _MatchType.PREFIX:
            return path.startswith(self.text[:-2])
        if self.match_type is _MatchType.SUFFIX:
            suffix = self.text[2:]
            if path.endswith(suffix):
                return True
            # "**/foo" also matches "foo" itself.
            return suffix.startswith("/") and path == suffix[1:]
        assert self.regexp is not None
        return self.regexp.fullmatch(path) is not None

    def without_trailing_glob(self) -> str:
        """The pattern minus a trailing "/**" or "/*" (fsutil filter.go's prefix check)."""
        text = self.text.removesuffix("/**")
        return text.removesuffix("/*")


def _translate(pattern: str) -> tuple[_MatchType, str]:
    """Pattern -> (match type, regexp body), following patternmatcher's `compile`.

    The type detection is kept exactly, quirks included: a leading "**" makes a
    suffix match even when later characters would need a regexp ("**/foo").
    """
    out: list[str] = []
    detected = _MatchType.EXACT
    i = 0
    n = len(pattern)
    index = 0  # count of scanned tokens, as the Go loop's `i`
    while i < n:
        ch = pattern[i]
        i += 1
        if ch == "*":
            if i < n and pattern[i] == "*":
                i += 1
                if i < n and pattern[i] == "/":
                    i += 1
                if i >= n:
                    if detected is _MatchType.EXACT:
                        detected = _MatchType.PREFIX
                    else:
                        out.append(".*")
                        detected = _MatchType.REGEXP
                else:
                    out.append("(.*/)?")
                    detected = _MatchType.REGEXP
                if index == 0:
                    detected = _MatchType.SUFFIX
            else:
                out.append("[^/]*")
                detected = _MatchType.REGEXP
        elif ch == "?":
            out.append("[^/]")
            detected = _MatchType.REGEXP
        elif ch in _REGEX_ESCAPE:
            out.append("\\" + ch)
        elif ch == "\\":
            if i < n:
                # Go copies "\x" into the regexp; re.escape keeps "\d" literal
                # where Go would read a class: patterns escape glob characters,
                # not letters, so the difference does not arise in practice.
                out.append(re.escape(pattern[i]))
                i += 1
                detected = _MatchType.REGEXP
            else:
                out.append("\\\\")
        elif ch in "[]":
            out.append(ch)
            detected = _MatchType.REGEXP
        else:
            out.append(ch)
        index += 1
    return detected, "".join(out)


class PatternMatcher:
    """An ordered list of patterns where later "!" patterns re-include paths."""

    def __init__(self, patterns: Iterable[str]) -> None:
        compiled = (Pattern.compile(p) for p in patterns)
        self.patterns: tuple[Pattern, ...] = tuple(p for p in compiled if p is not None)
        self.has_exclusions = any(p.exclusion for p in self.patterns)

    def matches_or_parent_matches(self, path: str) -> bool:
        """patternmatcher's MatchesOrParentMatches: the path or any parent matches."""
        matched, _ = self.matches_using_parent_results(path, None)
        return matched

    def matches_using_parent_results(
        self, path: str, parent: tuple[bool, ...] | None
    ) -> tuple[bool, tuple[bool, ...]]:
        """patternmatcher's MatchesUsingParentResults.

        `parent` is the per-pattern result for the parent directory (None at the
        top or when unknown, in which case every parent is checked explicitly).
        Returns the verdict and this path's per-pattern results for its children.
        """
        matched = False
        results: list[bool] = []
        parent_dirs: list[str] | None = None
        for index, pattern in enumerate(self.patterns):
            match = parent[index] if parent else False
            if not match:
                # An inclusion can't change a match, an exclusion can't undo a miss.
                if pattern.exclusion != matched:
                    results.append(False)
                    continue
                match = pattern.matches(path)
                if not match and not parent:
                    if parent_dirs is None:
                        head = path.rpartition("/")[0]
                        parent_dirs = head.split("/") if head else []
                    for depth in range(1, len(parent_dirs) + 1):
                        if pattern.matches("/".join(parent_dirs[:depth])):
                            match = True
                            break
            results.append(match)
            if match:
                matched = not pattern.exclusion
        return matched, tuple(results)


# --- walking (fsutil fs.go, filter.go, stat.go, followlinks.go) -----------------


@dataclasses.dataclass(frozen=True, slots=True)
class Entry:
    """One walked entry, already in the form the daemon receives."""

    path: str
    """Relative, "/"-separated, clean."""
    mode: int
    """Go os.FileMode bits."""
    size: int
    mtime_ns: int
    linkname: str = ""
    """Symlink target, or the first occurrence's path for a hard link."""

    @property
    def is_regular(self) -> bool:
        """Only regular files (hard links included) may be requested (fsutil send.go)."""
        return self.mode & MODE_TYPE == 0

    def to_stat(self) -> stat_pb2.Stat:
        """The fsutil Stat for this entry; uid/gid are 0 as the Go client resets them."""
        return stat_pb2.Stat(
            path=os.fsencode(self.path),
            mode=self.mode,
            size=self.size,
            modTime=self.mtime_ns,
            linkname=os.fsencode(self.linkname),
        )


def go_file_mode(st_mode: int) -> int | None:
    """POSIX st_mode -> Go FileMode bits; None for types we skip (sockets, FIFOs, devices)."""
    mode = st_mode & 0o777
    if stat.S_ISDIR(st_mode):
        mode |= MODE_DIR
    elif stat.S_ISLNK(st_mode):
        mode |= MODE_SYMLINK
    elif not stat.S_ISREG(st_mode):
        return None
    if st_mode & stat.S_ISUID:
        mode |= MODE_SETUID
    if st_mode & stat.S_ISGID:
        mode |= MODE_SETGID
    if st_mode & stat.S_ISVTX:
        mode |= MODE_STICKY
    return mode


_PATTERN_CHARS = frozenset("*[]?^\\")


def _only_prefixes(patterns: Iterable[Pattern], *, exclusion: bool) -> bool:
    return not any(
        p.exclusion == exclusion and _PATTERN_CHARS.intersection(p.without_trailing_glob())
        for p in patterns
    )


def _could_match_inside(patterns: Iterable[Pattern], directory: str, *, exclusion: bool) -> bool:
    prefix = directory + "/"
    return any(
        p.exclusion == exclusion and (p.without_trailing_glob() + "/").startswith(prefix)
        for p in patterns
    )


@dataclasses.dataclass(slots=True)
class _Dir:
    """A directory on the current walk path, sent at the latest before its first kept child."""

    path: str
    mode: int
    mtime_ns: int
    emitted: bool

    def entry(self) -> Entry:
        return Entry(path=self.path, mode=self.mode, size=0, mtime_ns=self.mtime_ns)


class _Walker:
    def __init__(self, include: PatternMatcher | None, exclude: PatternMatcher | None) -> None:
        self.include = include
        self.exclude = exclude
        self.only_prefix_includes = include is None or _only_prefixes(
            include.patterns, exclusion=False
        )
        self.only_prefix_exceptions = exclude is None or _only_prefixes(
            exclude.patterns, exclusion=True
        )
        self.entries: list[Entry] = []
        self.inodes: dict[tuple[int, int], str] = {}

    def walk(
        self,
        abs_dir: str,
        rel_dir: str,
        parents: list[_Dir],
        include_info: tuple[bool, ...] | None,
        exclude_info: tuple[bool, ...] | None,
    ) -> None:
        try:
            names = sorted(os.listdir(abs_dir), key=os.fsencode)
        except OSError as exc:
            raise WalkError(f"cannot list {rel_dir or '.'}: {exc.strerror}") from exc
        for name in names:
            self.visit(abs_dir, rel_dir, name, parents, include_info, exclude_info)

    def visit(
        self,
        abs_dir: str,
        rel_dir: str,
        name: str,
        parents: list[_Dir],
        include_info: tuple[bool, ...] | None,
        exclude_info: tuple[bool, ...] | None,
    ) -> None:
        rel = f"{rel_dir}/{name}" if rel_dir else name
        abs_path = os.path.join(abs_dir, name)
        try:
            st = os.lstat(abs_path)
        except FileNotFoundError:
            return  # removed while walking, as fsutil does
        except OSError as exc:
            raise WalkError(f"cannot stat {rel}: {exc.strerror}") from exc
        mode = go_file_mode(st.st_mode)
        if mode is None:
            return
        is_dir = bool(mode & MODE_DIR)
        skip = False
        child_include: tuple[bool, ...] | None = None
        child_exclude: tuple[bool, ...] | None = None
        if self.include is not None:
            matched, child_include = self.include.matches_using_parent_results(rel, include_info)
            if not matched:
                # filter.go's shortcut: with plain-prefix includes, a directory no
                # include reaches into is not walked at all.
                if (
                    is_dir
                    and self.only_prefix_includes
                    and not _could_match_inside(self.include.patterns, rel, exclusion=False)
                ):
                    return
                skip = True
        if self.exclude is not None:
            matched, child_exclude = self.exclude.matches_using_parent_results(rel, exclude_info)
            if matched:
                # Likewise an excluded directory is walked only if a "!" exception
                # could re-include something inside it.
                if (
                    is_dir
                    and self.only_prefix_exceptions
                    and not (
                        self.exclude.has_exclusions
                        and _could_match_inside(self.exclude.patterns, rel, exclusion=True)
                    )
                ):
                    return
                skip = True

        if not skip:
            entry = self.make_entry(rel, abs_path, mode, st)
            # fsutil filter.go: parents of a kept entry are sent just before it.
            for parent in parents:
                if not parent.emitted:
                    self.entries.append(parent.entry())
                    parent.emitted = True
            self.entries.append(entry)
        if is_dir:
            parents.append(_Dir(path=rel, mode=mode, mtime_ns=st.st_mtime_ns, emitted=not skip))
            try:
                self.walk(abs_path, rel, parents, child_include, child_exclude)
            finally:
                parents.pop()

    def make_entry(self, rel: str, abs_path: str, mode: int, st: os.stat_result) -> Entry:
        if mode & MODE_DIR:
            return Entry(path=rel, mode=mode, size=0, mtime_ns=st.st_mtime_ns)
        if mode & MODE_SYMLINK:
            try:
                target = os.readlink(abs_path)
            except OSError as exc:
                raise WalkError(f"cannot read link {rel}: {exc.strerror}") from exc
            return Entry(
                path=rel, mode=mode, size=st.st_size, mtime_ns=st.st_mtime_ns, linkname=target
            )
        if st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            first = self.inodes.get(key)
            if first is not None:
                return Entry(path=rel, mode=mode, size=0, mtime_ns=st.st_mtime_ns, linkname=first)
            self.inodes[key] = rel
        return Entry(path=rel, mode=mode, size=st.st_size, mtime_ns=st.st_mtime_ns)


def _contains_wildcards(name: str) -> bool:
    i = 0
    while i < len(name):
        if name[i] == "\\":
            i += 2
            continue
        if name[i] in "*?[":
            return True
        i += 1
    return False


def _join(*parts: str) -> str:
    return clean_path("/".join(p for p in parts if p))


def resolve_follow_paths(root: str, paths: Iterable[str]) -> list[str]:
    """fsutil followlinks.go: each path plus every symlink along it and its targets.

    Returns include patterns: the symlinks met and the final paths, relative to
    the root, sorted and with children of listed paths dropped. An empty list
    means "no filter" (a path resolved to the root itself).
    """
    resolved: set[str] = set()

    def read_links(rel: str, allow_wildcard: bool) -> list[str] | None:
        base = rel.rpartition("/")[2]
        head = rel.rpartition("/")[0]
        if allow_wildcard and _contains_wildcards(base):
            try:
                names = sorted(os.listdir(os.path.join(root, head)), key=os.fsencode)
            except (FileNotFoundError, NotADirectoryError):
                return None
            pattern = Pattern.compile(base)
            found: list[str] = []
            for name in names:
                if pattern is not None and pattern.matches(name):
                    targets = read_links(_join(head, name), False)
                    found.extend(targets or [])
            # Go returns a nil slice when no matched name was a symlink.
            return found or None
        if rel in (".", ""):
            return None
        abs_path = os.path.join(root, rel)
        try:
            st = os.lstat(abs_path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not stat.S_ISLNK(st.st_mode):
            return None
        link = clean_path(os.readlink(abs_path))
        if link.startswith("/"):
            return [link]
        return [clean_path("/" + _join(head, link))]

    def append(path: str, depth: int) -> None:
        if depth > 255:
            raise WalkError(f"too many levels of symbolic links following {path!r}")
        rest = clean_path(path.lstrip("/")) if path.strip("/") else "."
        current = "."
        while True:
            first, _, rest = rest.partition("/")
            current = _join("" if current == "." else current, first)
            targets = read_links(current, True)
            if (not rest or targets is not None) and current in resolved:
                return
            if targets is not None:
                resolved.add(current)
                for target in targets:
                    append(f"{target}/{rest}", depth + 1)
                return
            if not rest:
                resolved.add(current)
                return

    for p in paths:
        append(p, 0)
    out: list[str] = []
    last: str | None = None
    for candidate in sorted(resolved):
        if candidate == ".":
            return []
        if last is not None and candidate.startswith(last + "/"):
            continue
        out.append(candidate)
        last = candidate
    return out


def walk(
    root: str | os.PathLike[str],
    *,
    include_patterns: Sequence[str] = (),
    exclude_patterns: Sequence[str] = (),
    follow_paths: Sequence[str] = (),
) -> list[Entry]:
    """Walk `root` into the entries to send, in the daemon's required order.

    Depth-first pre-order, each directory's names sorted byte-wise, the root
    itself not included. Patterns follow dockerignore semantics; `follow_paths`
    adds the paths and the symlinks along them to the include patterns.
    """
    real_root = os.path.realpath(os.fspath(root))
    if not os.path.isdir(real_root):
        raise WalkError(f"{os.fspath(root)!r} is not a directory")
    includes = list(include_patterns)
    if follow_paths:
        targets = resolve_follow_paths(real_root, follow_paths)
        # Appended after the caller's patterns so their "!" order is kept.
        includes += [t for t in targets if t not in includes]
    include = PatternMatcher(includes) if includes else None
    exclude = PatternMatcher(exclude_patterns) if exclude_patterns else None
    if include is not None and not include.patterns:
        include = None
    if exclude is not None and not exclude.patterns:
        exclude = None
    walker = _Walker(include, exclude)
    walker.walk(real_root, "", [], None, None)
    return walker.entries


# --- the packet protocol (fsutil send.go) --------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class FileRequested:
    """The receiver asked for the content of entry `id` (a regular file)."""

    id: int
    path: str
    size: int


@dataclasses.dataclass(frozen=True, slots=True)
class ReceiverFinished:
    """The receiver wrote everything and sent FIN; answer with `FileSender.fin()`."""


Event = FileRequested | ReceiverFinished


class SenderState(enum.Enum):
    SENDING_STATS = enum.auto()
    """STATs (and the end marker) still to send; REQs may already arrive."""
    SERVING = enum.auto()
    """All STATs sent; answering REQs until the receiver's FIN."""
    FINISHING = enum.auto()
    """The receiver sent FIN; we owe it ours."""
    DONE = enum.auto()
    FAILED = enum.auto()


class FileSender:
    """fsutil's sender as a pure state machine.

    The caller sends `next_stats()` until it returns nothing, feeds every packet
    from the receiver to `receive()`, reads each requested file and sends its
    content as `data()` packets followed by `end_of_file()`, and answers
    `ReceiverFinished` with `fin()`. Entry ids are walk positions (send.go counts
    every STAT, directories and symlinks too).
    """

    def __init__(self, entries: Sequence[Entry]) -> None:
        self._entries = entries
        self._next_stat = 0
        self._requested: set[int] = set()
        self._open: set[int] = set()
        self.state = SenderState.SENDING_STATS
        self.bytes_sent = 0
        """File content bytes handed out in DATA packets so far."""

    @property
    def files_requested(self) -> int:
        """How many files the receiver asked for (fewer than sent on incremental syncs)."""
        return len(self._requested)

    @property
    def open_files(self) -> int:
        """Requested files whose EOF has not been sent yet."""
        return len(self._open)

    def next_stats(self, limit: int) -> list[wire_pb2.Packet]:
        """Up to `limit` STAT packets; the empty end-of-list STAT comes last."""
        if self.state is not SenderState.SENDING_STATS:
            return []
        end = min(self._next_stat + limit, len(self._entries))
        packets = [
            wire_pb2.Packet(type=PACKET_STAT, stat=self._entries[i].to_stat())
            for i in range(self._next_stat, end)
        ]
        self._next_stat = end
        if end == len(self._entries) and len(packets) < limit:
            # The end marker has no `stat` field at all (send.go's last SendMsg).
            packets.append(wire_pb2.Packet(type=PACKET_STAT))
            self.state = SenderState.SERVING
        return packets

    def receive(self, packet: wire_pb2.Packet) -> Event | None:
        """Process one packet from the receiver."""
        if self.state in (SenderState.DONE, SenderState.FAILED, SenderState.FINISHING):
            raise RemoteProtocolError(f"packet type {packet.type} after the transfer ended")
        if packet.type == PACKET_REQ:
            return self._request(packet.ID)
        if packet.type == PACKET_FIN:
            self.state = SenderState.FINISHING
            return ReceiverFinished()
        if packet.type == PACKET_ERR:
            self.state = SenderState.FAILED
            message = packet.data.decode("utf-8", errors="replace")
            raise ReceiverError(f"error from receiver: {message}")
        self.state = SenderState.FAILED
        raise RemoteProtocolError(f"unexpected packet type {packet.type} from receiver")

    def _request(self, file_id: int) -> FileRequested:
        # send.go forgets an id once queued, so a repeated REQ is an invalid id too.
        if (
            file_id >= self._next_stat
            or file_id in self._requested
            or not self._entries[file_id].is_regular
        ):
            self.state = SenderState.FAILED
            raise RemoteProtocolError(f"invalid file id {file_id}")
        self._requested.add(file_id)
        self._open.add(file_id)
        entry = self._entries[file_id]
        return FileRequested(id=file_id, path=entry.path, size=entry.size)

    def data(self, file_id: int, chunk: bytes) -> wire_pb2.Packet:
        """A DATA packet carrying the next piece of a requested file."""
        if file_id not in self._open:
            raise LocalProtocolError(f"data for file {file_id}, which is not being sent")
        if not chunk:
            raise LocalProtocolError("an empty DATA packet means EOF: use end_of_file()")
        self.bytes_sent += len(chunk)
        return wire_pb2.Packet(type=PACKET_DATA, ID=file_id, data=chunk)

    def end_of_file(self, file_id: int) -> wire_pb2.Packet:
        """The empty DATA packet ending a requested file."""
        if file_id not in self._open:
            raise LocalProtocolError(f"EOF for file {file_id}, which is not being sent")
        self._open.discard(file_id)
        return wire_pb2.Packet(type=PACKET_DATA, ID=file_id)

    def fin(self) -> wire_pb2.Packet:
        """Our FIN, answering the receiver's; the transfer is then complete."""
        if self.state is not SenderState.FINISHING:
            raise LocalProtocolError("FIN may only answer the receiver's FIN")
        self.state = SenderState.DONE
        return wire_pb2.Packet(type=PACKET_FIN)

    def error(self, message: str) -> wire_pb2.Packet:
        """An ERR packet aborting the transfer (the receiver reports "error from sender")."""
        self.state = SenderState.FAILED
        return wire_pb2.Packet(type=PACKET_ERR, data=message.encode("utf-8", errors="replace"))
