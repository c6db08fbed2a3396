"""Marshal structure, determinism and Go-compatible byte layout of LLB definitions."""

from __future__ import annotations

import hashlib

import pytest

from build_runner import llb
from build_runner._pb.buildkit import ops_pb2
from tests.unit.llb_decode import decode, top_level_field_numbers

AMD64 = llb.Platform.parse("linux/amd64")


def _graph() -> llb.State:
    """A graph touching every op kind and every map field, built fresh each call."""
    base = llb.image("docker.io/library/busybox:1.36", platform=AMD64, name="base")
    ctx = llb.local(
        "context",
        exclude_patterns=["*.pyc", ".git"],
        shared_key_hint="context",
        unique_id="build-1",
        custom_name="load context",
    )
    st = base.add_env("B", "2").add_env("A", "1").dir("/app")
    st = st.file(
        llb.mkdir("/app", make_parents=True).then(
            llb.copy(ctx, "/", "/app/", dir_copy_contents=True, create_dest_path=True)
        ),
        name="copy context",
    )
    st = st.run(
        "make",
        mounts=[
            llb.CacheMount("/root/.cache", "pip", llb.CacheSharing.LOCKED),
            llb.TmpfsMount("/tmp"),
        ],
        name="build",
    )
    layer = llb.diff(base, st, name="diff")
    return llb.merge([base, layer], name="merge")


def test_definition_structure() -> None:
    st = llb.image("busybox", platform=AMD64, name="base").run("true", name="run")
    definition = llb.marshal(st)
    decoded = decode(definition)

    assert len(getattr(definition, "def")) == 3
    source, exec_ = (decoded.ops[d] for d in decoded.digests)
    assert source.WhichOneof("op") == "source"
    assert source.source.identifier == "docker-image://docker.io/library/busybox:latest"
    assert exec_.WhichOneof("op") == "exec"
    assert [i.digest for i in exec_.inputs] == [decoded.digests[0]]
    # The terminal op carries only the input edge to the result.
    assert decoded.terminal.WhichOneof("op") is None
    assert not decoded.terminal.HasField("platform")
    assert [(i.digest, i.index) for i in decoded.terminal.inputs] == [(decoded.digests[1], 0)]
    # Metadata keys are exactly the digests of the bytes in `def`.
    raw = getattr(definition, "def")
    assert set(definition.metadata) == {"sha256:" + hashlib.sha256(b).hexdigest() for b in raw}
    terminal_md = definition.metadata["sha256:" + hashlib.sha256(raw[-1]).hexdigest()]
    assert dict(terminal_md.caps) == {
        "constraints": True,
        "platform": True,
        "meta.description": True,
    }


def test_dependencies_come_before_dependents() -> None:
    decoded = decode(llb.marshal(_graph()))
    seen: set[str] = set()
    for digest in decoded.digests:
        for inp in decoded.ops[digest].inputs:
            assert inp.digest in seen, "an op references one that comes later"
        seen.add(digest)
    assert len(decoded.digests) == 6  # image, local, file, exec, diff, merge


def test_marshal_is_deterministic_over_100_fresh_graphs() -> None:
    first = llb.marshal(_graph()).SerializeToString(deterministic=True)
    for _ in range(100):
        assert llb.marshal(_graph()).SerializeToString(deterministic=True) == first


def test_attr_insertion_order_does_not_change_bytes() -> None:
    a = llb.local("ctx", include_patterns=["a"], exclude_patterns=["b"], unique_id="u")
    b = llb.local("ctx", exclude_patterns=["b"], include_patterns=["a"], unique_id="u")
    assert getattr(llb.marshal(a), "def")[0] == getattr(llb.marshal(b), "def")[0]


def test_different_content_gives_different_digest() -> None:
    one = llb.marshal(llb.scratch().file(llb.mkfile("/f", 0o644, b"1")))
    two = llb.marshal(llb.scratch().file(llb.mkfile("/f", 0o644, b"2")))
    assert decode(one).digests != decode(two).digests


def test_op_fields_are_written_in_go_order() -> None:
    """Regular fields (inputs 1, platform 10, constraints 11) first, then the oneof."""
    st = llb.image("busybox", platform=AMD64).run("true")
    raw = getattr(llb.marshal(st), "def")
    assert top_level_field_numbers(raw[0]) == [10, 11, 3]
    assert top_level_field_numbers(raw[1]) == [1, 10, 11, 2]
    # A FileOp has no platform but still an (empty) constraints message.
    file_raw = getattr(llb.marshal(st.file(llb.rm("/x"))), "def")[2]
    assert top_level_field_numbers(file_raw) == [1, 11, 4]


def test_image_source_bytes_match_hand_encoding() -> None:
    """Known-answer: the exact bytes Go's deterministic marshal writes for this op."""
    raw = getattr(llb.marshal(llb.image("busybox", platform=AMD64)), "def")[0]
    platform = b"\x0a\x05amd64" + b"\x12\x05linux"
    ident = b"docker-image://docker.io/library/busybox:latest"
    source = b"\x0a" + bytes([len(ident)]) + ident
    expected = (
        b"\x52" + bytes([len(platform)]) + platform  # field 10, platform
        + b"\x5a\x00"  # field 11, empty WorkerConstraints
        + b"\x1a" + bytes([len(source)]) + source  # field 3, the source oneof
    )  # fmt: skip
    assert raw == expected


def test_serialized_ops_parse_back_to_the_same_message() -> None:
    for raw in getattr(llb.marshal(_graph()), "def"):
        op = ops_pb2.Op.FromString(raw)
        # Reordered fields are still valid protobuf: a re-parse loses nothing.
        again = ops_pb2.Op.FromString(raw)
        assert op == again
        assert op.ByteSize() == len(raw)


def test_identical_ops_collapse_to_one_vertex() -> None:
    a = llb.image("busybox", platform=AMD64)
    b = llb.image("busybox", platform=AMD64)
    c = a.file(llb.mkfile("/c", 0o644, b"c"))
    merged = llb.merge([a, b, c])
    decoded = decode(llb.marshal(merged))
    assert len(decoded.digests) == 3  # one image op, the file op, the merge
    merge_op = decoded.result()
    assert [i.digest for i in merge_op.inputs][:2] == [decoded.digests[0]] * 2


def test_scratch_marshals_to_empty_definition() -> None:
    assert len(getattr(llb.marshal(llb.scratch()), "def")) == 0


def test_default_platform_fills_exec_and_image_only() -> None:
    st = llb.image("busybox").run("true").file(llb.rm("/x"))
    decoded = decode(llb.marshal(st, platform=llb.Platform.parse("linux/arm64/v8")))
    kinds = {decoded.ops[d].WhichOneof("op"): decoded.ops[d] for d in decoded.digests}
    assert kinds["source"].platform.Architecture == "arm64"
    assert kinds["exec"].platform.Variant == "v8"
    assert not kinds["file"].HasField("platform")
    without = decode(llb.marshal(llb.image("busybox")))
    assert not without.result().HasField("platform")


def test_metadata_names_ignore_cache_and_caps() -> None:
    st = llb.image("busybox", name="base").run("true", name="step", ignore_cache=True)
    definition = llb.marshal(st)
    decoded = decode(definition)
    md = definition.metadata[decoded.digest_of("step")]
    assert md.ignore_cache
    assert md.caps["exec.meta.base"]
    assert md.caps["exec.mount.bind"]
    terminal_md = definition.metadata[
        "sha256:" + hashlib.sha256(getattr(definition, "def")[-1]).hexdigest()
    ]
    assert terminal_md.caps["meta.ignorecache"]
    assert not definition.metadata[decoded.digest_of("base")].ignore_cache


def test_deep_chain_does_not_recurse() -> None:
    st = llb.scratch()
    for i in range(3000):
        st = st.file(llb.mkfile(f"/f{i}", 0o644, b""))
    decoded = decode(llb.marshal(st))
    assert len(decoded.digests) == 3000


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("alpine", "docker.io/library/alpine:latest"),
        ("alpine:3.20", "docker.io/library/alpine:3.20"),
        ("team/app", "docker.io/team/app:latest"),
        ("127.0.0.1:5000/busybox", "127.0.0.1:5000/busybox:latest"),
        ("localhost/a/b:1", "localhost/a/b:1"),
        ("ghcr.io/a/b@sha256:ab", "ghcr.io/a/b@sha256:ab"),
        ("reg.example.com:5000/x:v1@sha256:ab", "reg.example.com:5000/x:v1@sha256:ab"),
    ],
)
def test_image_reference_normalization(ref: str, expected: str) -> None:
    assert llb.normalize_image_ref(ref) == expected


@pytest.mark.parametrize("ref", ["", "Alpine", "docker://x", "x:"])
def test_invalid_image_references(ref: str) -> None:
    with pytest.raises(ValueError, match="invalid image reference"):
        llb.normalize_image_ref(ref)
