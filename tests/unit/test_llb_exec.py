"""ExecOp marshalling: meta, mount order and outputs, mount kinds, network/security."""

from __future__ import annotations

import pytest

from build_runner import llb
from build_runner._pb.buildkit import ops_pb2
from tests.unit.llb_decode import decode

BASE = llb.image("busybox", platform=llb.Platform.parse("linux/amd64"), name="base")


def test_meta_from_state_context() -> None:
    st = BASE.add_env("PATH", "/bin").add_env("A", "1").add_env("PATH", "/usr/bin")
    st = st.dir("/app").dir("src").user("1000:1000")
    op = decode(llb.marshal(st.run(["echo", "hi"]))).result()
    meta = op.exec.meta
    assert list(meta.args) == ["echo", "hi"]
    # Replacing a variable keeps its position.
    assert list(meta.env) == ["PATH=/usr/bin", "A=1"]
    assert meta.cwd == "/app/src"
    assert meta.user == "1000:1000"
    assert meta.removeMountStubsRecursive
    assert op.platform.OS == "linux"


def test_shell_form_and_default_cwd() -> None:
    meta = decode(llb.marshal(BASE.run("echo $HOME"))).result().exec.meta
    assert list(meta.args) == ["/bin/sh", "-c", "echo $HOME"]
    # An empty cwd makes runc fail ("Cwd property must not be empty"): "/" by default.
    assert meta.cwd == "/"


def test_mounts_sorted_by_target_with_outputs_in_order() -> None:
    data = llb.scratch().file(llb.mkfile("/d", 0o644, b"d"), name="data")
    ro = llb.scratch().file(llb.mkfile("/r", 0o644, b"r"), name="ro")
    run = BASE.run(
        "true",
        mounts=[
            llb.BindMount("/z-out", data.output),
            llb.SecretMount("/run/secrets/token", "token"),
            llb.CacheMount("/cache", "c1", llb.CacheSharing.PRIVATE),
            llb.BindMount("/a-ro", ro.output, readonly=True, selector="/r"),
            llb.TmpfsMount("/tmp", size_bytes=1 << 20),
            llb.BindMount("/m-out", None),
        ],
        name="run",
    )
    definition = llb.marshal(run)
    decoded = decode(definition)
    op = decoded.named("run")
    mounts = [(m.dest, m.output, m.mountType, m.readonly) for m in op.exec.mounts]
    assert mounts == [
        ("/", 0, ops_pb2.BIND, False),
        ("/a-ro", -1, ops_pb2.BIND, True),
        ("/cache", -1, ops_pb2.CACHE, False),
        ("/m-out", 1, ops_pb2.BIND, False),
        ("/tmp", -1, ops_pb2.TMPFS, False),
        ("/z-out", 2, ops_pb2.BIND, False),
        # Secrets come after the sorted mounts and carry no output (Go leaves it 0).
        ("/run/secrets/token", 0, ops_pb2.SECRET, False),
    ]
    by_dest = {m.dest: m for m in op.exec.mounts}
    assert [i.digest for i in op.inputs] == [
        decoded.digest_of("base"),
        decoded.digest_of("ro"),
        decoded.digest_of("data"),
    ]
    assert by_dest["/a-ro"].input == 1
    assert by_dest["/a-ro"].selector == "/r"
    assert by_dest["/z-out"].input == 2
    assert by_dest["/m-out"].input == -1
    assert by_dest["/cache"].input == -1
    assert by_dest["/cache"].cacheOpt.ID == "c1"
    assert by_dest["/cache"].cacheOpt.sharing == ops_pb2.PRIVATE
    assert by_dest["/tmp"].TmpfsOpt.size == 1 << 20
    secret = by_dest["/run/secrets/token"].secretOpt
    assert (secret.ID, secret.mode, secret.optional) == ("token", 0o400, False)
    caps = definition.metadata[decoded.digest_of("run")].caps
    for cap in (
        "exec.meta.base",
        "exec.mount.bind",
        "exec.mount.selector",
        "exec.mount.cache",
        "exec.mount.cache.sharing",
        "exec.mount.tmpfs",
        "exec.mount.tmpfs.size",
        "exec.mount.secret",
    ):
        assert caps[cap], cap
    # get_mount() points at the same output numbers the daemon will produce.
    z_out = run.get_mount("/z-out").output
    assert z_out is not None
    assert z_out.index == 2
    m_out = run.get_mount("/m-out").output
    assert m_out is not None
    assert m_out.index == 1
    with pytest.raises(ValueError, match="no result"):
        run.get_mount("/cache")


def test_later_op_uses_second_output_of_exec() -> None:
    run = BASE.run("make", mounts=[llb.BindMount("/out", None)], name="make")
    st = BASE.file(llb.copy(run.get_mount("/out"), "/bin/app", "/usr/bin/app"), name="cp")
    decoded = decode(llb.marshal(st))
    inputs = [(i.digest, i.index) for i in decoded.named("cp").inputs]
    assert inputs == [(decoded.digest_of("base"), 0), (decoded.digest_of("make"), 1)]


def test_same_state_mounted_twice_is_one_input() -> None:
    op = decode(
        llb.marshal(BASE.run("true", mounts=[llb.BindMount("/again", BASE.output, readonly=True)]))
    ).result()
    assert len(op.inputs) == 1
    assert [m.input for m in op.exec.mounts] == [0, 0]


def test_readonly_root_has_no_result() -> None:
    run = BASE.run("true", readonly_rootfs=True, mounts=[llb.BindMount("/out", None)])
    assert run.output is None  # the root mount is readonly: no result
    op = decode(llb.marshal(run.get_mount("/out"))).result()
    assert [(m.dest, m.output, m.readonly) for m in op.exec.mounts] == [
        ("/", -1, True),
        ("/out", 0, False),
    ]


def test_network_security_secret_env_and_exit_codes() -> None:
    st = BASE.network(llb.NetworkMode.HOST).security(llb.SecurityMode.INSECURE)
    run = st.run(
        "true",
        secret_env=[llb.SecretEnv("npm", "NPM_TOKEN", optional=True)],
        valid_exit_codes=[0, 3],
        extra_hosts={"db": "10.0.0.2"},
        hostname="builder",
        name="run",
    )
    definition = llb.marshal(run)
    decoded = decode(definition)
    op = decoded.named("run").exec
    assert op.network == ops_pb2.HOST
    assert op.security == ops_pb2.INSECURE
    assert [(s.ID, s.name, s.optional) for s in op.secretenv] == [("npm", "NPM_TOKEN", True)]
    assert list(op.meta.validExitCodes) == [0, 3]
    assert [(h.Host, h.IP) for h in op.meta.extraHosts] == [("db", "10.0.0.2")]
    assert op.meta.hostname == "builder"
    caps = definition.metadata[decoded.digest_of("run")].caps
    for cap in ("exec.meta.network", "exec.meta.security", "exec.secretenv", "exec.validexitcode"):
        assert caps[cap], cap


def test_default_network_writes_no_field() -> None:
    op = decode(llb.marshal(BASE.run("true"))).result()
    assert op.exec.network == ops_pb2.UNSET
    assert (
        "exec.meta.network"
        not in llb.marshal(BASE.run("true"))
        .metadata[decode(llb.marshal(BASE.run("true"))).digests[1]]
        .caps
    )


@pytest.mark.parametrize(
    ("mounts", "message"),
    [
        ([llb.BindMount("/", None)], "root mount"),
        ([llb.TmpfsMount("/t"), llb.TmpfsMount("/t")], "duplicate"),
        ([llb.TmpfsMount("rel")], "absolute"),
    ],
)
def test_invalid_mounts_are_rejected(mounts: list[llb.ops.Mount], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BASE.run("true", mounts=mounts)


def test_states_are_immutable() -> None:
    st = BASE.dir("/a")
    st.add_env("X", "1")
    st.dir("/b")
    assert st.env == ()
    assert st.cwd == "/a"
    with pytest.raises(AttributeError):
        st.cwd = "/c"  # type: ignore[misc]
