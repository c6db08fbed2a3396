"""Test-side reader for marshalled Definitions: ops by digest, terminal op, field order."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from build_runner._pb.buildkit import ops_pb2


@dataclass(frozen=True)
class Decoded:
    """A Definition taken apart: ops in `def` order, by digest, and the terminal op."""

    digests: list[str]
    ops: dict[str, ops_pb2.Op]
    terminal: ops_pb2.Op
    definition: ops_pb2.Definition

    def op(self, digest: str) -> ops_pb2.Op:
        return self.ops[digest]

    def result(self) -> ops_pb2.Op:
        """The op the terminal op points at."""
        return self.ops[self.terminal.inputs[0].digest]

    def named(self, name: str) -> ops_pb2.Op:
        """The op whose metadata carries `llb.customname` = name."""
        hits = [
            d
            for d, md in self.definition.metadata.items()
            if md.description.get("llb.customname") == name
        ]
        assert len(hits) == 1, f"{len(hits)} ops named {name!r}"
        return self.ops[hits[0]]

    def digest_of(self, name: str) -> str:
        return next(
            d
            for d, md in self.definition.metadata.items()
            if md.description.get("llb.customname") == name
        )


def decode(definition: ops_pb2.Definition) -> Decoded:
    raw = list(getattr(definition, "def"))
    digests = ["sha256:" + hashlib.sha256(b).hexdigest() for b in raw]
    ops = {d: ops_pb2.Op.FromString(b) for d, b in zip(digests, raw, strict=True)}
    return Decoded(
        digests=digests[:-1],
        ops={d: ops[d] for d in digests[:-1]},
        terminal=ops[digests[-1]],
        definition=definition,
    )


def top_level_field_numbers(data: bytes) -> list[int]:
    """Field numbers of a serialized message's top-level fields, in wire order."""
    numbers: list[int] = []
    pos = 0

    def varint() -> int:
        nonlocal pos
        shift = value = 0
        while True:
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    while pos < len(data):
        key = varint()
        numbers.append(key >> 3)
        wire = key & 7
        if wire == 0:
            varint()
        elif wire == 2:
            length = varint()  # read first: `pos += varint()` would use the old pos
            pos += length
        else:
            raise AssertionError(f"unexpected wire type {wire}")
    return numbers
