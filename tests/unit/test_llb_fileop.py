"""FileOp marshalling: action index space, sentinels, paths, owners and caps."""

from __future__ import annotations

from build_runner import llb
from tests.unit.llb_decode import decode

BASE = llb.image("busybox", platform=llb.Platform.parse("linux/amd64"), name="base")


def test_chained_actions_index_space() -> None:
    """0..N-1 are op inputs, N+i is the result of action i, the last action exports 0."""
    ctx = llb.local("context", unique_id="u", custom_name="ctx")
    chain = (
        llb.mkdir("/app", 0o755)
        .then(llb.copy(ctx, "/", "/app/", dir_copy_contents=True))
        .then(llb.mkfile("/app/VERSION", 0o644, b"1"))
    )
    decoded = decode(llb.marshal(BASE.file(chain, name="files")))
    op = decoded.named("files")

    assert [i.digest for i in op.inputs] == [decoded.digest_of("base"), decoded.digest_of("ctx")]
    actions = [
        (a.input, a.secondaryInput, a.output, a.WhichOneof("action")) for a in op.file.actions
    ]
    n = len(op.inputs)
    assert actions == [
        (0, -1, -1, "mkdir"),
        (n + 0, 1, -1, "copy"),
        (n + 1, -1, 0, "mkfile"),
    ]


def test_first_action_on_scratch_has_empty_input() -> None:
    decoded = decode(llb.marshal(llb.scratch().file(llb.mkfile("/f", 0o600, b"x"))))
    op = decoded.result()
    assert len(op.inputs) == 0
    action = op.file.actions[0]
    assert (action.input, action.secondaryInput, action.output) == (-1, -1, 0)
    assert action.mkfile.mode == 0o600
    assert action.mkfile.data == b"x"


def test_copy_from_the_same_state_reuses_the_input() -> None:
    st = BASE.file(llb.copy(BASE, "/bin/busybox", "/usr/local/bin/bb"))
    op = decode(llb.marshal(st)).result()
    assert len(op.inputs) == 1
    assert (op.file.actions[0].input, op.file.actions[0].secondaryInput) == (0, 0)


def test_copy_from_scratch_source_is_minus_one() -> None:
    op = decode(llb.marshal(BASE.file(llb.copy(llb.scratch(), "/", "/x")))).result()
    assert op.file.actions[0].secondaryInput == -1


def test_unset_timestamp_and_mode_are_minus_one_sentinels() -> None:
    chain = (
        llb.mkdir("/d")
        .then(llb.mkfile("/d/f", 0o644, b""))
        .then(llb.copy(BASE, "/etc/passwd", "/d/passwd"))
        .then(llb.symlink("/d/f", "/d/l"))
    )
    actions = decode(llb.marshal(llb.scratch().file(chain))).result().file.actions
    assert actions[0].mkdir.timestamp == -1
    assert actions[1].mkfile.timestamp == -1
    assert actions[2].copy.timestamp == -1
    assert actions[2].copy.mode == -1
    assert actions[3].symlink.timestamp == -1


def test_explicit_timestamp_and_modes() -> None:
    chain = (
        llb.mkdir("/d", 0o40750, created_ns=1_700_000_000_000_000_000)
        .then(llb.copy(BASE, "/etc/passwd", "/d/p", mode=0o600, created_ns=5))
        .then(llb.copy(BASE, "/etc/group", "/d/g", mode_str="u+x"))
    )
    actions = decode(llb.marshal(llb.scratch().file(chain))).result().file.actions
    # mkdir/mkfile keep permission bits only, like client/llb/fileop.go.
    assert actions[0].mkdir.mode == 0o750
    assert actions[0].mkdir.timestamp == 1_700_000_000_000_000_000
    assert (actions[1].copy.mode, actions[1].copy.timestamp) == (0o600, 5)
    # A mode string replaces the numeric mode, which stays 0 rather than -1.
    assert (actions[2].copy.modeStr, actions[2].copy.mode) == ("u+x", 0)


def test_relative_paths_resolve_against_working_dirs() -> None:
    src = llb.scratch().dir("/src")
    st = BASE.dir("/work").file(
        llb.mkdir("sub").then(llb.copy(src, "a/../b", "sub/")).then(llb.rm("old//x"))
    )
    actions = decode(llb.marshal(st)).result().file.actions
    assert actions[0].mkdir.path == "/work/sub"
    assert actions[1].copy.src == "/src/b"
    assert actions[1].copy.dest == "/work/sub/"  # the trailing slash means "into"
    assert actions[2].rm.path == "/work/old/x"


def test_copy_dest_keeps_slash_dot_and_cleans_double_slash() -> None:
    chain = llb.copy(BASE, "//etc", "/a/.").then(llb.copy(BASE, "/x", "//b//"))
    actions = decode(llb.marshal(llb.scratch().file(chain))).result().file.actions
    assert actions[0].copy.src == "/etc"
    assert actions[0].copy.dest == "/a/."
    assert actions[1].copy.dest == "/b/"


def test_copy_flags_and_patterns() -> None:
    st = BASE.file(
        llb.copy(
            BASE,
            "/src/*.txt",
            "/dst/",
            follow_symlinks=True,
            dir_copy_contents=True,
            create_dest_path=True,
            allow_wildcard=True,
            allow_empty_wildcard=True,
            include_patterns=["*.txt"],
            exclude_patterns=["secret*"],
            always_replace_existing_dest_paths=True,
        ),
        name="cp",
    )
    definition = llb.marshal(st)
    decoded = decode(definition)
    c = decoded.named("cp").file.actions[0].copy
    assert c.followSymlink
    assert c.dirCopyContents
    assert c.createDestPath
    assert c.allowWildcard
    assert c.allowEmptyWildcard
    assert c.alwaysReplaceExistingDestPaths
    assert not c.attemptUnpackDockerCompatibility
    assert list(c.include_patterns) == ["*.txt"]
    assert list(c.exclude_patterns) == ["secret*"]
    caps = definition.metadata[decoded.digest_of("cp")].caps
    assert caps["file.base"]
    assert caps["file.copy.includeexcludepatterns"]
    assert caps["file.copy.alwaysreplaceexistingdestpaths"]


def test_owner_by_name_resolves_in_the_base_input() -> None:
    ctx = llb.local("ctx", unique_id="u")
    chain = llb.mkdir("/a", owner=llb.Chown(1000, 1000)).then(
        llb.copy(ctx, "/", "/a", owner=llb.Chown("app", "staff"))
    )
    actions = decode(llb.marshal(BASE.file(chain))).result().file.actions
    assert actions[0].mkdir.owner.user.byID == 1000
    assert actions[0].mkdir.owner.group.byID == 1000
    owner = actions[1].copy.owner
    assert (owner.user.byName.name, owner.user.byName.input) == ("app", 0)
    assert (owner.group.byName.name, owner.group.byName.input) == ("staff", 0)


def test_owner_without_group_leaves_group_unset() -> None:
    action = (
        decode(llb.marshal(BASE.file(llb.mkfile("/f", 0o644, b"", owner=llb.Chown(7)))))
        .result()
        .file.actions[0]
    )
    assert action.mkfile.owner.user.byID == 7
    assert not action.mkfile.owner.HasField("group")


def test_rm_and_symlink_fields() -> None:
    chain = llb.rm("/tmp/*", allow_not_found=True, allow_wildcard=True).then(
        llb.symlink("../lib", "/usr/lib64")
    )
    definition = llb.marshal(BASE.file(chain, name="fs"))
    decoded = decode(definition)
    rm_, link = decoded.named("fs").file.actions
    assert (rm_.rm.path, rm_.rm.allowNotFound, rm_.rm.allowWildcard) == ("/tmp/*", True, True)
    assert (link.symlink.oldpath, link.symlink.newpath) == ("../lib", "/usr/lib64")
    assert definition.metadata[decoded.digest_of("fs")].caps["file.symlink.create"]


def test_then_appends_a_whole_chain() -> None:
    first = llb.mkdir("/a").then(llb.mkdir("/b"))
    second = llb.mkdir("/c").then(llb.mkdir("/d"))
    paths = [
        a.mkdir.path
        for a in decode(llb.marshal(llb.scratch().file(first.then(second)))).result().file.actions
    ]
    assert paths == ["/a", "/b", "/c", "/d"]
    # Chains are values: `first` was not changed by `then`.
    assert len(first.chain()) == 2
