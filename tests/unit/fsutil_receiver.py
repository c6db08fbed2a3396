"""An in-memory fsutil receiver that enforces the daemon's rules, for sender tests.

Written from the rules of tonistiigi/fsutil `receive.go`, `validator.go` and
`hardlinks.go`: STAT order (parents first, names strictly increasing byte-wise
per directory), hard links pointing at an earlier file, REQ only for regular
files, DATA reassembly ending with an empty packet, then the FIN handshake.
It is our own test double, not a port of the daemon's code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random

from build_runner import filesync
from build_runner._pb.buildkit.fsutil import stat_pb2, wire_pb2


class ReceiverRuleError(AssertionError):
    """The sender broke a rule the daemon's receiver enforces."""


class OrderValidator:
    """The daemon's ordering rule: a depth-first pre-order, byte-wise sorted walk."""

    def __init__(self) -> None:
        # (directory, last name seen in it) from the root down to the current dir.
        self._stack: list[tuple[str, bytes]] = [("", b"")]

    def check(self, path: str, *, is_dir: bool) -> None:
        if path != filesync.clean_path(path) or path in (".", ""):
            raise ReceiverRuleError(f"unclean path {path!r}")
        if path.startswith("/"):
            raise ReceiverRuleError(f"absolute path {path!r}")
        if path == ".." or path.startswith("../"):
            raise ReceiverRuleError(f"escaping path {path!r}")
        parent, _, base = path.rpartition("/")
        while len(self._stack) > 1:
            top = self._stack[-1][0]
            if parent == top or parent.startswith(top + "/"):
                break
            self._stack.pop()
        top_dir, last = self._stack[-1]
        name = os.fsencode(base)
        if parent != top_dir or (last and last >= name) or (not last and not name):
            raise ReceiverRuleError(f"changes out of order: {path!r} after {top_dir!r}/{last!r}")
        self._stack[-1] = (top_dir, name)
        if is_dir:
            self._stack.append((path, b""))


@dataclasses.dataclass
class ReceivedFile:
    stat: stat_pb2.Stat
    data: bytearray = dataclasses.field(default_factory=bytearray)
    complete: bool = False


class FakeReceiver:
    """Plays the daemon's side of DiffCopy over serialized packets."""

    def __init__(
        self,
        *,
        eager: bool = False,
        seed: int = 0,
        wanted: set[str] | None = None,
    ) -> None:
        self.eager = eager
        self.wanted = wanted
        self.random = random.Random(seed)
        self.validator = OrderValidator()
        self.stats: list[stat_pb2.Stat] = []
        self.files: dict[int, ReceivedFile] = {}
        self.stats_done = False
        self.finished = False
        self.sent_fin = False
        self._seen_files: set[str] = set()

    @staticmethod
    def _wire(packet: wire_pb2.Packet) -> wire_pb2.Packet:
        # Every packet crosses a real serialization, as it would on the stream.
        return wire_pb2.Packet.FromString(packet.SerializeToString())

    def receive(self, packet: wire_pb2.Packet) -> list[wire_pb2.Packet]:
        """Take one packet from the sender; return the packets to answer with."""
        packet = self._wire(packet)
        if self.finished:
            raise ReceiverRuleError("packet after FIN")
        if packet.type == wire_pb2.Packet.PACKET_STAT:
            return self._stat(packet)
        if packet.type == wire_pb2.Packet.PACKET_DATA:
            return self._data(packet)
        if packet.type == wire_pb2.Packet.PACKET_FIN:
            if not self.sent_fin:
                raise ReceiverRuleError("sender FIN before receiver FIN")
            self.finished = True
            return []
        if packet.type == wire_pb2.Packet.PACKET_ERR:
            raise ReceiverRuleError(f"error from sender: {packet.data.decode()}")
        raise ReceiverRuleError(f"unexpected packet {packet.type}")

    def _stat(self, packet: wire_pb2.Packet) -> list[wire_pb2.Packet]:
        if self.stats_done:
            raise ReceiverRuleError("STAT after the end marker")
        if not packet.HasField("stat"):
            self.stats_done = True
            reqs = [] if self.eager else self._requests(list(self.files))
            return reqs + self._maybe_fin()
        st = packet.stat
        # Names are raw bytes on the wire; keep them as surrogate-escaped str here.
        path, linkname = os.fsdecode(st.path), os.fsdecode(st.linkname)
        is_dir = bool(st.mode & filesync.MODE_DIR)
        self.validator.check(path, is_dir=is_dir)
        if st.uid or st.gid:
            raise ReceiverRuleError(f"{path!r}: uid/gid should be reset to 0")
        index = len(self.stats)
        self.stats.append(st)
        if st.mode & filesync.MODE_TYPE == 0:
            if linkname:
                if linkname not in self._seen_files:
                    raise ReceiverRuleError(f"invalid link {path!r} to unknown path {linkname!r}")
            else:
                self._seen_files.add(path)
                if self.wanted is None or path in self.wanted:
                    self.files[index] = ReceivedFile(stat=st)
                    if self.eager:
                        return self._requests([index])
        return []

    def _requests(self, ids: list[int]) -> list[wire_pb2.Packet]:
        ids = list(ids)
        self.random.shuffle(ids)
        return [wire_pb2.Packet(type=wire_pb2.Packet.PACKET_REQ, ID=i) for i in ids]

    def _data(self, packet: wire_pb2.Packet) -> list[wire_pb2.Packet]:
        received = self.files.get(packet.ID)
        if received is None or received.complete:
            raise ReceiverRuleError(f"invalid file request {packet.ID}")
        if packet.data:
            received.data += packet.data
            return []
        received.complete = True
        if len(received.data) != received.stat.size:
            got, said = len(received.data), received.stat.size
            raise ReceiverRuleError(f"{received.stat.path!r}: got {got} bytes, stat said {said}")
        return self._maybe_fin()

    def _maybe_fin(self) -> list[wire_pb2.Packet]:
        if self.stats_done and all(f.complete for f in self.files.values()) and not self.sent_fin:
            self.sent_fin = True
            return [wire_pb2.Packet(type=wire_pb2.Packet.PACKET_FIN)]
        return []

    def by_path(self) -> dict[str, stat_pb2.Stat]:
        return {os.fsdecode(s.path): s for s in self.stats}

    def digests(self) -> dict[str, str]:
        return {
            os.fsdecode(f.stat.path): hashlib.sha256(f.data).hexdigest()
            for f in self.files.values()
        }
