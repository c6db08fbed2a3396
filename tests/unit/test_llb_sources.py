"""Sources (image, local, git), merge and diff."""

from __future__ import annotations

import json

import pytest

from build_runner import llb
from tests.unit.llb_decode import decode

AMD64 = llb.Platform.parse("linux/amd64")


def test_image_source_attrs_platform_caps() -> None:
    definition = llb.marshal(llb.image("busybox:1.36", platform=AMD64, resolve_mode="pull"))
    decoded = decode(definition)
    op = decoded.result()
    assert op.source.identifier == "docker-image://docker.io/library/busybox:1.36"
    assert dict(op.source.attrs) == {"image.resolvemode": "pull"}
    assert (op.platform.OS, op.platform.Architecture) == ("linux", "amd64")
    caps = definition.metadata[decoded.digests[0]].caps
    assert caps["source.image"]
    assert caps["source.image.resolvemode"]


def test_local_source_attrs() -> None:
    st = llb.local(
        "context",
        include_patterns=["src/", "*.toml"],
        exclude_patterns=["a<b>&c", "é"],
        follow_paths=["Dockerfile"],
        shared_key_hint="ctx",
        unique_id="build-42",
        differ="none",
    )
    definition = llb.marshal(st)
    decoded = decode(definition)
    op = decoded.result()
    attrs = dict(op.source.attrs)
    assert op.source.identifier == "local://context"
    assert not op.HasField("platform")
    assert attrs["local.unique"] == "build-42"
    assert "local.session" not in attrs
    assert attrs["local.includepattern"] == '["src/","*.toml"]'
    # Go's json.Marshal escapes <, > and & and keeps UTF-8 as is.
    assert attrs["local.excludepatterns"] == '["a\\u003cb\\u003e\\u0026c","é"]'
    assert json.loads(attrs["local.excludepatterns"]) == ["a<b>&c", "é"]
    assert attrs["local.followpaths"] == '["Dockerfile"]'
    assert attrs["local.sharedkeyhint"] == "ctx"
    assert attrs["local.differ"] == "none"
    caps = definition.metadata[decoded.digests[0]].caps
    assert set(caps) == {
        "source.local",
        "source.local.unique",
        "source.local.includepatterns",
        "source.local.excludepatterns",
        "source.local.followpaths",
        "source.local.sharedkeyhint",
    }


def test_local_with_session_id_has_no_unique_attr() -> None:
    op = decode(llb.marshal(llb.local("ctx", session_id="sess"))).result()
    assert dict(op.source.attrs) == {"local.session": "sess"}


def test_git_source_identifier_and_attrs() -> None:
    st = llb.git(
        "https://github.com/moby/buildkit.git", "v0.32.2", subdir="docs/", keep_git_dir=True
    )
    op = decode(llb.marshal(st)).result()
    assert op.source.identifier == "git://github.com/moby/buildkit.git#v0.32.2:docs"
    assert dict(op.source.attrs) == {
        "git.fullurl": "https://github.com/moby/buildkit.git",
        "git.keepgitdir": "true",
        "git.authtokensecret": "GIT_AUTH_TOKEN",
        "git.authheadersecret": "GIT_AUTH_HEADER",
    }
    plain = decode(llb.marshal(llb.git("example.com:8443/repo"))).result()
    assert plain.source.identifier == "git://example.com:8443/repo"


def test_merge_inputs_in_order_and_scratch_dropped() -> None:
    a = llb.scratch().file(llb.mkfile("/a", 0o644, b"a"), name="a")
    b = llb.scratch().file(llb.mkfile("/b", 0o644, b"b"), name="b")
    definition = llb.marshal(llb.merge([a, llb.scratch(), b], name="merge"))
    decoded = decode(definition)
    op = decoded.named("merge")
    assert [i.digest for i in op.inputs] == [decoded.digest_of("a"), decoded.digest_of("b")]
    assert [m.input for m in op.merge.inputs] == [0, 1]
    assert not op.HasField("platform")
    assert definition.metadata[decoded.digest_of("merge")].caps["mergeop"]


def test_merge_of_one_or_none_needs_no_op() -> None:
    a = llb.scratch().file(llb.mkfile("/a", 0o644, b"a"))
    assert llb.merge([llb.scratch(), a]) is a
    assert llb.merge([llb.scratch()]).output is None


def test_diff_inputs_and_scratch_lower() -> None:
    a = llb.scratch().file(llb.mkfile("/a", 0o644, b"a"), name="a")
    b = a.file(llb.mkfile("/b", 0o644, b"b"), name="b")
    definition = llb.marshal(llb.diff(a, b, name="diff"))
    decoded = decode(definition)
    op = decoded.named("diff")
    assert [i.digest for i in op.inputs] == [decoded.digest_of("a"), decoded.digest_of("b")]
    assert (op.diff.lower.input, op.diff.upper.input) == (0, 1)
    assert definition.metadata[decoded.digest_of("diff")].caps["diffop"]
    from_scratch = decode(llb.marshal(llb.diff(llb.scratch(), b))).result()
    assert (from_scratch.diff.lower.input, from_scratch.diff.upper.input) == (-1, 0)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: llb.image("busybox", resolve_mode="sometimes"), "resolve mode"),
        (lambda: llb.local(""), "needs a name"),
        (lambda: llb.local("x", differ="fast"), "differ"),
        (lambda: llb.git("ssh://git@host/repo"), "unsupported git URL"),
        (lambda: llb.Platform.parse("linux"), "invalid platform"),
        (lambda: llb.scratch().add_env("A=B", "1"), "environment variable"),
        (lambda: llb.copy(llb.scratch(), "/a", "/b", mode=0o644, mode_str="u+x"), "not both"),
    ],
)
def test_invalid_arguments(call: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()  # type: ignore[operator]
