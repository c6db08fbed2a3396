"""The pure file-sync sender: walk order, stats, patterns and the packet protocol."""

from __future__ import annotations

import hashlib
import os
import stat
from collections import deque
from pathlib import Path

import pytest

from build_runner import filesync
from build_runner._pb.buildkit.fsutil import wire_pb2
from tests.unit.fsutil_receiver import FakeReceiver, OrderValidator, ReceiverRuleError

CHUNK = 32 * 1024


def transfer(
    root: Path, entries: list[filesync.Entry], receiver: FakeReceiver, *, stat_batch: int = 7
) -> filesync.FileSender:
    """Move packets between a FileSender and the receiver until the FIN handshake."""
    sender = filesync.FileSender(entries)
    to_sender: deque[wire_pb2.Packet] = deque()
    real_root = Path(os.path.realpath(root))
    while sender.state is not filesync.SenderState.DONE:
        for packet in sender.next_stats(stat_batch):
            to_sender.extend(receiver.receive(packet))
        if not to_sender:
            assert sender.state is filesync.SenderState.SENDING_STATS, "deadlock"
            continue
        event = sender.receive(to_sender.popleft())
        if isinstance(event, filesync.FileRequested):
            with open(real_root / event.path, "rb") as f:
                while chunk := f.read(CHUNK):
                    to_sender.extend(receiver.receive(sender.data(event.id, chunk)))
            to_sender.extend(receiver.receive(sender.end_of_file(event.id)))
        elif isinstance(event, filesync.ReceiverFinished):
            assert sender.open_files == 0
            receiver.receive(sender.fin())
    assert receiver.finished
    return sender


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "ctx"
    root.mkdir()
    (root / "a").mkdir()
    (root / "a" / "b").write_bytes(b"ab")
    (root / "a-b").write_bytes(b"a-b")
    (root / "B").write_bytes(b"upper")
    (root / "empty").mkdir()
    (root / "empty" / "deeper").mkdir()
    (root / "run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(root / "run.sh", 0o755)
    (root / "secret.txt").write_bytes(b"s")
    os.chmod(root / "secret.txt", 0o600)
    (root / "sticky").mkdir()
    os.chmod(root / "sticky", 0o1777)
    (root / "link").symlink_to("a/b")
    (root / "dangling").symlink_to("../nowhere")
    (root / "hard1").write_bytes(b"shared content")
    os.link(root / "hard1", root / "hard2")
    for name in ["with space", "tab\there", "new\nline", "ünïcødé-é", "-dash", "#hash%25", "日本"]:
        (root / name).write_bytes(name.encode())
    os.mkfifo(root / "fifo")
    os.utime(root / "a" / "b", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    return root


def test_walk_order_is_depth_first_bytewise_and_accepted_by_the_validator(tree: Path) -> None:
    entries = filesync.walk(tree)
    paths = [e.path for e in entries]
    # "a", "a/b", "a-b": a directory is followed by its subtree even though a
    # plain sort of full paths would put "a-b" before "a/b".
    assert paths.index("a") + 1 == paths.index("a/b")
    assert paths.index("a/b") < paths.index("a-b")
    # Byte-wise: uppercase before "-", "#" and lowercase; multibyte UTF-8 last.
    assert paths[:3] == ["#hash%25", "-dash", "B"]
    assert paths[-2:] == ["ünïcødé-é", "日本"]
    validator = OrderValidator()
    for e in entries:
        validator.check(e.path, is_dir=bool(e.mode & filesync.MODE_DIR))
    assert "fifo" not in paths


def test_validator_rejects_a_full_path_sort() -> None:
    validator = OrderValidator()
    validator.check("a", is_dir=True)
    validator.check("a-b", is_dir=False)
    with pytest.raises(ReceiverRuleError, match="out of order"):
        validator.check("a/b", is_dir=False)


def test_stats_carry_go_modes_sizes_mtimes_and_links(tree: Path) -> None:
    by_path = {e.path: e for e in filesync.walk(tree)}
    assert by_path["run.sh"].mode == 0o755
    assert by_path["secret.txt"].mode == 0o600
    assert by_path["a"].mode == filesync.MODE_DIR | 0o755 & ~_umask()
    assert by_path["sticky"].mode == filesync.MODE_DIR | filesync.MODE_STICKY | 0o777
    assert by_path["link"].mode & filesync.MODE_SYMLINK
    assert by_path["link"].linkname == "a/b"
    assert by_path["link"].size == len("a/b")
    assert by_path["dangling"].linkname == "../nowhere"
    assert by_path["a/b"].mtime_ns == 1_600_000_000_123_456_789
    assert by_path["a/b"].size == 2
    assert by_path["empty/deeper"].mode & filesync.MODE_DIR
    # Hard links: the first occurrence is a file, the second points at it.
    assert by_path["hard1"].linkname == ""
    assert by_path["hard1"].size == len(b"shared content")
    assert by_path["hard2"].linkname == "hard1"
    assert by_path["hard2"].size == 0
    assert by_path["hard2"].is_regular


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize(
    ("st_mode", "expected"),
    [
        (stat.S_IFREG | 0o644, 0o644),
        (stat.S_IFREG | stat.S_ISUID | 0o755, filesync.MODE_SETUID | 0o755),
        (stat.S_IFREG | stat.S_ISGID | 0o750, filesync.MODE_SETGID | 0o750),
        (stat.S_IFDIR | 0o700, filesync.MODE_DIR | 0o700),
        (stat.S_IFDIR | stat.S_ISVTX | 0o777, filesync.MODE_DIR | filesync.MODE_STICKY | 0o777),
        (stat.S_IFLNK | 0o777, filesync.MODE_SYMLINK | 0o777),
        (stat.S_IFIFO | 0o644, None),
        (stat.S_IFSOCK | 0o755, None),
        (stat.S_IFCHR | 0o666, None),
        (stat.S_IFBLK | 0o660, None),
    ],
)
def test_go_file_mode(st_mode: int, expected: int | None) -> None:
    assert filesync.go_file_mode(st_mode) == expected


def test_full_transfer_reassembles_every_file(tree: Path) -> None:
    big = os.urandom(3 * 1024 * 1024 + 17)
    (tree / "a" / "big.bin").write_bytes(big)
    entries = filesync.walk(tree)
    receiver = FakeReceiver(seed=1)
    sender = transfer(tree, entries, receiver)
    digests = receiver.digests()
    assert sender.files_requested == len(digests)
    assert sender.bytes_sent == sum(len(f.data) for f in receiver.files.values())
    assert digests["a/big.bin"] == sha(big)
    assert digests["new\nline"] == sha(b"new\nline")
    assert digests["hard1"] == sha(b"shared content")
    assert "hard2" not in digests  # a hard link is recreated, never requested
    assert receiver.by_path()["link"].linkname == b"a/b"
    assert receiver.by_path()["empty/deeper"].mode & filesync.MODE_DIR
    assert len(receiver.stats) == len(entries)


@pytest.mark.parametrize("stat_batch", [1, 3, 1000])
def test_requests_interleaved_with_stats(tree: Path, stat_batch: int) -> None:
    entries = filesync.walk(tree)
    receiver = FakeReceiver(eager=True, seed=stat_batch)
    transfer(tree, entries, receiver, stat_batch=stat_batch)
    assert receiver.digests()["a/b"] == sha(b"ab")


def test_receiver_asking_for_nothing_still_finishes(tree: Path) -> None:
    receiver = FakeReceiver(wanted=set())
    sender = transfer(tree, filesync.walk(tree), receiver)
    assert receiver.files == {}
    assert (sender.files_requested, sender.bytes_sent) == (0, 0)


def test_end_marker_is_a_stat_packet_without_stat() -> None:
    sender = filesync.FileSender([filesync.Entry(path="f", mode=0o644, size=0, mtime_ns=1)])
    packets = sender.next_stats(1)
    assert [p.HasField("stat") for p in packets] == [True]
    (marker,) = sender.next_stats(1)
    assert marker.type == wire_pb2.Packet.PACKET_STAT
    assert not marker.HasField("stat")
    assert marker.SerializeToString() == b""
    assert sender.next_stats(5) == []
    assert sender.state is filesync.SenderState.SERVING


def test_empty_directory_sends_only_the_end_marker(tmp_path: Path) -> None:
    assert filesync.walk(tmp_path) == []
    receiver = FakeReceiver()
    transfer(tmp_path, [], receiver)
    assert receiver.stats == []


def test_context_root_behind_a_symlink_is_resolved(tree: Path, tmp_path: Path) -> None:
    (tmp_path / "via").symlink_to(tree)
    assert filesync.walk(tmp_path / "via") == filesync.walk(tree)


def test_not_a_directory(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(filesync.WalkError, match="not a directory"):
        filesync.walk(tmp_path / "f")


# --- odd names ---------------------------------------------------------------------


def test_non_utf8_names_and_targets_go_out_as_raw_bytes(tmp_path: Path) -> None:
    root = os.fsencode(tmp_path)
    os.makedirs(os.path.join(root, b"d\xfe"))
    with open(os.path.join(root, b"d\xfe", b"bad\xff"), "wb") as f:
        f.write(b"content")
    os.symlink(b"target\xff", os.path.join(root, b"l"))
    os.symlink(b"d\xfe/bad\xff", os.path.join(root, b"m"))
    entries = filesync.walk(tmp_path)
    stats = [e.to_stat() for e in entries]
    assert [s.path for s in stats] == [b"d\xfe", b"d\xfe/bad\xff", b"l", b"m"]
    assert [s.linkname for s in stats] == [b"", b"", b"target\xff", b"d\xfe/bad\xff"]
    receiver = FakeReceiver()
    transfer(tmp_path, entries, receiver)
    assert receiver.digests() == {os.fsdecode(b"d\xfe/bad\xff"): sha(b"content")}


def test_non_utf8_name_excluded_is_fine(tmp_path: Path) -> None:
    os.makedirs(os.path.join(os.fsencode(tmp_path), b"bad\xfedir"))
    with open(os.path.join(os.fsencode(tmp_path), b"bad\xfedir", b"x"), "wb") as f:
        f.write(b"x")
    (tmp_path / "ok").write_bytes(b"ok")
    entries = filesync.walk(tmp_path, exclude_patterns=["bad*"])
    assert [e.path for e in entries] == ["ok"]


# --- patterns ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("foo", "foo", True),
        ("foo", "foobar", False),
        ("*.go", "main.go", True),
        ("*.go", "pkg/main.go", False),
        ("*/*.go", "pkg/main.go", True),
        ("**/*.go", "a/b/c.go", True),
        ("**/*.go", "c.go", True),
        ("**/foo", "foo", True),
        ("**/foo", "x/y/foo", True),
        ("**/foo", "x/yfoo", False),
        ("foo/**", "foo/a/b", True),
        ("foo/**", "foobar", False),
        ("a/**/b", "a/b", True),
        ("a/**/b", "a/x/y/b", True),
        ("a/**/b", "a/x/y/c", False),
        ("**", "anything/at/all", True),
        ("?.txt", "a.txt", True),
        ("?.txt", "ab.txt", False),
        ("?.txt", "/.txt", False),
        ("[a-c].md", "b.md", True),
        ("[a-c].md", "d.md", False),
        ("[^a].md", "b.md", True),
        ("a.b", "axb", False),
        ("a+b(c)", "a+b(c)", True),
        ("dir/", "dir", True),
        ("./dir/../x", "x", True),
        (r"\*", "*", True),
        (r"\*", "a", False),
        # As in Go's regexp: a negated class crosses newlines, "." does not.
        ("new*", "new\nline", True),
        ("*line", "new\nline", True),
        ("a/**/b", "a/x\ny/b", False),
    ],
)
def test_pattern_table(pattern: str, path: str, expected: bool) -> None:
    compiled = filesync.Pattern.compile(pattern)
    assert compiled is not None
    assert compiled.matches(path) is expected


@pytest.mark.parametrize(
    ("patterns", "path", "expected"),
    [
        (["node_modules"], "node_modules/x/y.js", True),
        (["node_modules", "!node_modules/keep"], "node_modules/keep/a", False),
        (["node_modules", "!node_modules/keep"], "node_modules/drop", True),
        (["*.log", "!important.log"], "important.log", False),
        (["*.log", "!important.log", "important.log"], "important.log", True),
        (["  ", "docs"], "docs/a", True),
        (["docs"], "src/docs", False),
    ],
)
def test_matcher_exceptions_and_parents(patterns: list[str], path: str, expected: bool) -> None:
    assert filesync.PatternMatcher(patterns).matches_or_parent_matches(path) is expected


@pytest.mark.parametrize("bad", ["!", "[", "a[b"])
def test_bad_patterns(bad: str) -> None:
    with pytest.raises(filesync.PatternError):
        filesync.PatternMatcher([bad])


def _paths(root: Path, **kwargs: list[str]) -> list[str]:
    return [e.path for e in filesync.walk(root, **kwargs)]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    for rel in [
        "src/app.py",
        "src/lib/util.py",
        "src/lib/util.pyc",
        "node_modules/dep/index.js",
        "node_modules/keep/keep.js",
        "docs/readme.md",
        "Dockerfile",
        "build.log",
        "important.log",
    ]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(rel.encode())
    return tmp_path


def test_exclude_with_exception_sends_parents(project: Path) -> None:
    paths = _paths(
        project,
        exclude_patterns=[
            "node_modules",
            "!node_modules/keep",
            "*.log",
            "!important.log",
            "**/*.pyc",
        ],
    )
    assert paths == [
        "Dockerfile",
        "docs",
        "docs/readme.md",
        "important.log",
        "node_modules",
        "node_modules/keep",
        "node_modules/keep/keep.js",
        "src",
        "src/app.py",
        "src/lib",
        "src/lib/util.py",
    ]


def test_include_patterns_keep_matches_and_their_parents(project: Path) -> None:
    paths = _paths(project, include_patterns=["src/lib", "Dockerfile"])
    assert paths == ["Dockerfile", "src", "src/lib", "src/lib/util.py", "src/lib/util.pyc"]
    paths = _paths(project, include_patterns=["**/*.py"])
    assert paths == ["src", "src/app.py", "src/lib", "src/lib/util.py"]


def test_include_and_exclude_together(project: Path) -> None:
    paths = _paths(project, include_patterns=["src"], exclude_patterns=["**/*.pyc", "src/app.py"])
    assert paths == ["src", "src/lib", "src/lib/util.py"]


def test_excluded_directory_is_not_walked(project: Path) -> None:
    # An unreadable directory inside an excluded one must not matter.
    locked = project / "node_modules" / "locked"
    locked.mkdir()
    (locked / "x").write_bytes(b"x")
    locked.chmod(0)
    try:
        paths = _paths(project, exclude_patterns=["node_modules"])
    finally:
        locked.chmod(0o755)
    assert not any(p.startswith("node_modules") for p in paths)


def test_follow_paths_add_symlinks_and_targets(tmp_path: Path) -> None:
    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "real" / "sub" / "f").write_bytes(b"f")
    (tmp_path / "other").write_bytes(b"o")
    (tmp_path / "alias").symlink_to("real")
    (tmp_path / "abs").symlink_to("/real/sub")  # absolute: resolved inside the root
    assert filesync.resolve_follow_paths(str(tmp_path), ["alias/sub/f"]) == [
        "alias",
        "real/sub/f",
    ]
    assert filesync.resolve_follow_paths(str(tmp_path), ["abs"]) == ["abs", "real/sub"]
    assert filesync.resolve_follow_paths(str(tmp_path), ["."]) == []
    # fsutil records the wildcard component itself; as an include it matches "alias".
    assert filesync.resolve_follow_paths(str(tmp_path), ["al*/sub"]) == ["al*", "real/sub"]
    paths = _paths(tmp_path, follow_paths=["alias/sub/f"])
    assert paths == ["alias", "real", "real/sub", "real/sub/f"]


def test_hard_link_to_an_excluded_file_is_sent_as_a_file(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"same")
    os.link(tmp_path / "a", tmp_path / "b")
    (entry,) = filesync.walk(tmp_path, exclude_patterns=["a"])
    assert (entry.path, entry.linkname, entry.size) == ("b", "", 4)


# --- protocol errors ---------------------------------------------------------------


def _sender_with_stats() -> filesync.FileSender:
    sender = filesync.FileSender(
        [
            filesync.Entry(path="d", mode=filesync.MODE_DIR | 0o755, size=0, mtime_ns=0),
            filesync.Entry(path="d/f", mode=0o644, size=3, mtime_ns=0),
            filesync.Entry(path="l", mode=filesync.MODE_SYMLINK | 0o777, size=1, mtime_ns=0),
        ]
    )
    sender.next_stats(2)
    return sender


def _req(file_id: int) -> wire_pb2.Packet:
    return wire_pb2.Packet(type=wire_pb2.Packet.PACKET_REQ, ID=file_id)


@pytest.mark.parametrize(
    ("packets", "error"),
    [
        ([_req(0)], "invalid file id 0"),  # a directory
        ([_req(2)], "invalid file id 2"),  # not sent yet (and a symlink)
        ([_req(1), _req(1)], "invalid file id 1"),
        ([wire_pb2.Packet(type=wire_pb2.Packet.PACKET_DATA, ID=1)], "unexpected packet type"),
        ([wire_pb2.Packet(type=wire_pb2.Packet.PACKET_STAT)], "unexpected packet type"),
    ],
)
def test_remote_protocol_errors(packets: list[wire_pb2.Packet], error: str) -> None:
    sender = _sender_with_stats()
    *before, last = packets
    for p in before:
        sender.receive(p)
    with pytest.raises(filesync.RemoteProtocolError, match=error):
        sender.receive(last)
    assert sender.state is filesync.SenderState.FAILED


def test_receiver_err_packet() -> None:
    sender = _sender_with_stats()
    with pytest.raises(filesync.ReceiverError, match="error from receiver: disk full"):
        sender.receive(wire_pb2.Packet(type=wire_pb2.Packet.PACKET_ERR, data=b"disk full"))


def test_local_protocol_errors() -> None:
    sender = _sender_with_stats()
    with pytest.raises(filesync.LocalProtocolError):
        sender.data(1, b"x")  # not requested
    with pytest.raises(filesync.LocalProtocolError):
        sender.fin()  # the receiver has not finished
    event = sender.receive(_req(1))
    assert event == filesync.FileRequested(id=1, path="d/f", size=3)
    with pytest.raises(filesync.LocalProtocolError, match="empty DATA"):
        sender.data(1, b"")
    assert sender.data(1, b"abc").data == b"abc"
    assert sender.end_of_file(1).data == b""
    with pytest.raises(filesync.LocalProtocolError):
        sender.end_of_file(1)
    err = sender.error("boom")
    assert (err.type, err.data) == (wire_pb2.Packet.PACKET_ERR, b"boom")
