"""LLB: build BuildKit graphs as immutable states and marshal them to `pb.Definition`.

Pure (no grpc, no I/O). Mirrors moby/buildkit `client/llb` with snake_case names:

    st = llb.image("docker.io/library/busybox:latest").dir("/app")
    st = st.file(llb.mkfile("hello.txt", 0o644, b"hi"), name="write hello")
    st = st.run("cat hello.txt", name="print hello")
    definition = llb.marshal(st)
"""

from build_runner.llb.marshal import MarshalledOp, marshal, op_digest
from build_runner.llb.ops import (
    BindMount,
    CacheMount,
    CacheSharing,
    Chown,
    NetworkMode,
    Platform,
    SecretEnv,
    SecretMount,
    SecurityMode,
    TmpfsMount,
)
from build_runner.llb.state import (
    ExecState,
    FileAction,
    State,
    copy,
    diff,
    git,
    http,
    image,
    local,
    merge,
    mkdir,
    mkfile,
    normalize_image_ref,
    rm,
    scratch,
    symlink,
)

__all__ = [
    "BindMount",
    "CacheMount",
    "CacheSharing",
    "Chown",
    "ExecState",
    "FileAction",
    "MarshalledOp",
    "NetworkMode",
    "Platform",
    "SecretEnv",
    "SecretMount",
    "SecurityMode",
    "State",
    "TmpfsMount",
    "copy",
    "diff",
    "git",
    "http",
    "image",
    "local",
    "marshal",
    "merge",
    "mkdir",
    "mkfile",
    "normalize_image_ref",
    "op_digest",
    "rm",
    "scratch",
    "symlink",
]
