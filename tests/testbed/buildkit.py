"""Rootless buildkitd on loopback, run the way production runs it, plus a buildctl driver.

Owns: the daemon's state directory and config, starting it as the unprivileged
`lucity-buildkit` user under rootlesskit with `--oci-worker-no-process-sandbox`,
readiness, teardown, finding the real buildkitd pid (for /proc inspection), running
buildctl against it, and the offline busybox base image. The daemon gets an EMPTY,
read-only DOCKER_CONFIG and a minimal environment: registry credentials may only
reach it through a client's session. Usable outside pytest (tests/testbed/__main__.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.testbed.process import REPO, Daemon, DaemonError, binary, free_port

# The unprivileged account buildkitd runs as; scripts/install-testbed.sh (apt step)
# creates it with its own /etc/subuid and /etc/subgid ranges.
BUILDKIT_USER = "lucity-buildkit"

# buildkitd answers within 0.1-0.2 s here; the bound only turns a hang into an error.
READY_TIMEOUT_S = 30.0
# One probe must not hang the readiness loop if the socket accepts but never answers.
PROBE_TIMEOUT_S = 5.0
# buildkitd stops in well under a second when idle; an open client stream can make a
# graceful stop wait, and then the group-wide TERM/KILL of Daemon.stop takes over.
GRACEFUL_STOP_S = 5.0
# Generous for the small builds in tests; a stuck build fails instead of eating the
# whole 600 s pytest timeout without a message.
BUILDCTL_TIMEOUT_S = 300.0

# A PATH without the caller's additions: the daemon must find Debian's runc and
# newuidmap, nothing from a developer's shell.
DAEMON_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

BASE_IMAGE_CONTEXT = REPO / "tests" / "fixtures" / "busybox-base"
# Where the base image lives in the test registry; the tag is Debian bookworm's busybox.
BASE_IMAGE_REPOSITORY = "base/busybox"
BASE_IMAGE_TAG = "1.35"
# busybox applets the base image exposes as symlinks; enough for shell RUN steps.
BUSYBOX_APPLETS = (
    "sh", "ash", "ls", "cat", "cp", "mv", "rm", "ln", "mkdir", "rmdir", "chmod", "chown",
    "find", "grep", "sed", "awk", "head", "tail", "wc", "sort", "uniq", "tr", "cut",
    "sha256sum", "md5sum", "env", "echo", "printf", "test", "[", "true",
    "false", "sleep", "id", "whoami", "stat", "touch", "date", "uname", "tar", "gzip",
    "hostname", "pwd", "basename", "dirname", "readlink", "xargs", "tee", "du", "df",
    "httpd", "wget", "nc",
)  # fmt: skip
BUSYBOX_BINARY = Path("/bin/busybox")
# Public registries the test registry stands in for (nothing public is reachable here):
# an image a plan names as ghcr.io/x/y:t is pulled from 127.0.0.1:PORT/x/y:t.
MIRRORED_REGISTRIES = ("docker.io", "ghcr.io")


class BuildctlError(RuntimeError):
    """buildctl exited non-zero when the caller asked for success."""

    def __init__(self, argv: Sequence[str], result: subprocess.CompletedProcess[str]) -> None:
        tail = "\n".join(result.stderr.splitlines()[-25:])
        super().__init__(f"buildctl {' '.join(argv)} exited {result.returncode}:\n{tail}")
        self.returncode = result.returncode
        self.stderr = result.stderr


@dataclass
class BuildKit:
    """A running rootless buildkitd: its addresses, directories and process."""

    address: str
    """`unix:///.../buildkitd.sock`, the address the runner and buildctl use."""
    tcp_address: str
    """`tcp://127.0.0.1:PORT` (plain gRPC, no TLS: loopback tests only)."""
    state_dir: Path
    root: Path
    docker_config: Path
    """The daemon's DOCKER_CONFIG: empty and not writable by the daemon."""
    config_path: Path
    log_path: Path
    user: str
    buildctl_path: Path
    daemon: Daemon
    empty_client_config: Path
    """A DOCKER_CONFIG for clients that must offer no credentials."""
    _pid: int | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        """Pid of the buildkitd process itself (rootlesskit's grandchild, not the wrapper)."""
        if self._pid is None or not Path(f"/proc/{self._pid}").exists():
            self._pid = _find_buildkitd_pid(self._wrapper_pid())
        return self._pid

    def _wrapper_pid(self) -> int:
        assert self.daemon.process is not None
        return self.daemon.process.pid

    def buildctl(
        self,
        *args: str,
        docker_config: Path | None = None,
        env: Mapping[str, str] | None = None,
        check: bool = True,
        timeout_s: float = BUILDCTL_TIMEOUT_S,
    ) -> subprocess.CompletedProcess[str]:
        """Run `buildctl --addr <unix socket> ARGS`; the client's DOCKER_CONFIG is
        `docker_config`, or an empty directory so no credentials are offered by accident."""
        client_env = {
            "PATH": os.environ.get("PATH", DAEMON_PATH),
            "HOME": str(self.state_dir / "client-home"),
            "DOCKER_CONFIG": str(docker_config or self.empty_client_config),
        }
        client_env.update(env or {})
        argv = [str(self.buildctl_path), "--addr", self.address, *args]
        result = subprocess.run(
            argv, env=client_env, capture_output=True, text=True, timeout=timeout_s, check=False
        )
        if check and result.returncode != 0:
            raise BuildctlError(args, result)
        return result

    def stop(self, *, remove_state: bool = True) -> None:
        """Stop buildkitd and rootlesskit, kill build-step processes they left behind,
        then delete the state dir (the log stays)."""
        wrapper = self.daemon.process
        if wrapper is not None and wrapper.poll() is None:
            # Remember the whole tree first: with no process sandbox, a step's background
            # processes are not in a PID namespace that dies with the daemon, and once
            # their parent is gone they are reparented out of reach of this tree walk.
            tree = _descendants(wrapper.pid)
            pid = self._pid
            if pid is not None and pid in tree:
                # TERM only to buildkitd first: rootlesskit forwards a group-wide TERM as a
                # second signal, which makes buildkitd skip its graceful shutdown.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                if not _wait_gone({pid: tree[pid]}, GRACEFUL_STOP_S):
                    # Still draining a client stream: its forced shutdown needs two more
                    # TERMs and may still wait on a step, so end it outright.
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    _wait_gone({pid: tree[pid]}, GRACEFUL_STOP_S)
            self.daemon.stop()
            leftovers = {p: t for p, t in tree.items() if _start_time(p) == t}
            for leftover in leftovers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(leftover, signal.SIGKILL)
            _wait_gone(leftovers, GRACEFUL_STOP_S)
        if remove_state:
            shutil.rmtree(self.state_dir, ignore_errors=True)


def _process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time in clock ticks) for every process we can see."""
    table: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            # comm may contain spaces and parentheses; the fields after the last ')'
            # start at field 3 (state), so ppid is [1] and starttime (field 22) is [19].
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            table[int(entry.name)] = (int(fields[1]), int(fields[19]))
    return table


def _start_time(pid: int) -> int | None:
    """A process's start time, to tell it from a later process that reused its pid."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # A zombie still has its stat file but is already dead: it needs no killing.
    return None if fields[0] == "Z" else int(fields[19])


def _descendants(root_pid: int) -> dict[int, int]:
    """pid -> start time of every process below root_pid."""
    table = _process_table()
    found: dict[int, int] = {}
    for pid, (parent, started) in table.items():
        ancestor: int | None = parent
        while ancestor is not None and ancestor not in (0, 1, root_pid):
            ancestor = table[ancestor][0] if ancestor in table else None
        if ancestor == root_pid:
            found[pid] = started
    return found


def _wait_gone(processes: Mapping[int, int], timeout_s: float) -> bool:
    """Wait until none of the processes runs any more; False if the deadline passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        if all(_start_time(pid) != started for pid, started in processes.items()):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def _find_buildkitd_pid(wrapper_pid: int) -> int:
    for pid in sorted(_descendants(wrapper_pid)):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() == "buildkitd":
                return pid
    raise DaemonError(f"no buildkitd process found under rootlesskit pid {wrapper_pid}")


def _has_subid_range(path: Path, account: pwd.struct_passwd) -> bool:
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            owner = line.split(":", 1)[0]
            if owner in (account.pw_name, str(account.pw_uid)):
                return True
    return False


def _daemon_account(user: str | None) -> pwd.struct_passwd:
    """The account to run as: BUILDKIT_USER when we are root, else ourselves."""
    if os.geteuid() != 0:
        # Without root we cannot switch users; rootless as the caller is still rootless.
        return pwd.getpwuid(os.geteuid())
    name = user or BUILDKIT_USER
    try:
        account = pwd.getpwnam(name)
    except KeyError:
        raise DaemonError(
            f"user {name!r} for rootless buildkitd does not exist; "
            "run scripts/install-testbed.sh apt (as root) to create it"
        ) from None
    if account.pw_uid == 0:
        raise DaemonError(f"user {name!r} is root; buildkitd must run unprivileged")
    return account


def write_config(
    path: Path,
    *,
    insecure_registries: Sequence[str],
    mirrors: Mapping[str, Sequence[str]],
    debug: bool,
) -> None:
    """Write buildkitd.toml: OCI worker only, plain-HTTP access to the test registries,
    and registry mirrors (e.g. ghcr.io served by the test registry, since the real one
    is unreachable here). Credentials for a mirror are asked of the session under the
    mirror's own host name."""
    lines = [
        f"debug = {'true' if debug else 'false'}",
        "",
        "[worker.oci]",
        "  enabled = true",
        "",
        "[worker.containerd]",
        "  enabled = false",
    ]
    for host in insecure_registries:
        lines += ["", f'[registry."{host}"]', "  http = true", "  insecure = true"]
    for host, targets in mirrors.items():
        quoted = ", ".join(f'"{target}"' for target in targets)
        lines += ["", f'[registry."{host}"]', f"  mirrors = [{quoted}]"]
    path.write_text("\n".join(lines) + "\n")


def start_buildkitd(
    *,
    insecure_registries: Sequence[str] = (),
    mirrors: Mapping[str, Sequence[str]] | None = None,
    log_path: Path | None = None,
    state_parent: Path | None = None,
    user: str | None = None,
    extra_args: Sequence[str] = (),
    debug: bool = False,
    timeout_s: float = READY_TIMEOUT_S,
) -> BuildKit:
    """Start rootless buildkitd (no process sandbox) on a unix socket and a loopback port.

    The state dir is a fresh directory under the system temp dir, because the daemon's
    user must be able to traverse every parent (pytest's tmp dirs are root-only 0700).
    """
    account = _daemon_account(user)
    for subid in (Path("/etc/subuid"), Path("/etc/subgid")):
        if not _has_subid_range(subid, account):
            raise DaemonError(
                f"{account.pw_name} has no range in {subid}; rootlesskit needs one. "
                "Run scripts/install-testbed.sh apt (as root)."
            )
    buildkitd_bin = binary("buildkit", "buildkitd")
    buildctl_bin = binary("buildkit", "buildctl")
    rootlesskit = shutil.which("rootlesskit", path=DAEMON_PATH)
    if rootlesskit is None:
        raise DaemonError("rootlesskit not found; run scripts/install-testbed.sh apt")

    state = Path(tempfile.mkdtemp(prefix="lucity-buildkitd-", dir=state_parent))
    state.chmod(0o755)
    try:
        daemon, port = _launch(
            state,
            account=account,
            buildkitd_bin=buildkitd_bin,
            rootlesskit=rootlesskit,
            insecure_registries=insecure_registries,
            mirrors=mirrors or {},
            log_path=log_path or state / "buildkitd.log",
            extra_args=extra_args,
            debug=debug,
        )
    except BaseException:
        shutil.rmtree(state, ignore_errors=True)
        raise
    kit = BuildKit(
        address=f"unix://{state / 'run' / 'buildkitd.sock'}",
        tcp_address=f"tcp://127.0.0.1:{port}",
        state_dir=state,
        root=state / "root",
        docker_config=state / "docker-config",
        config_path=state / "buildkitd.toml",
        log_path=daemon.log_path,
        user=account.pw_name,
        buildctl_path=buildctl_bin,
        daemon=daemon,
        empty_client_config=state / "client-empty-docker-config",
    )
    try:
        daemon.wait_ready(lambda: _answers(kit), timeout_s=timeout_s)
        _ = kit.pid
    except BaseException:
        kit.stop()
        raise
    return kit


def _answers(kit: BuildKit) -> bool:
    # `debug workers` needs a loaded worker, so success means builds can be solved,
    # not merely that the socket exists. Both addresses must answer.
    if not Path(kit.address.removeprefix("unix://")).exists():
        return False
    for address in (kit.address, kit.tcp_address):
        result = subprocess.run(
            [str(kit.buildctl_path), "--addr", address, "debug", "workers"],
            capture_output=True,
            timeout=PROBE_TIMEOUT_S,
            check=False,
        )
        if result.returncode != 0:
            return False
    return True


def _launch(
    state: Path,
    *,
    account: pwd.struct_passwd,
    buildkitd_bin: Path,
    rootlesskit: str,
    insecure_registries: Sequence[str],
    mirrors: Mapping[str, Sequence[str]],
    log_path: Path,
    extra_args: Sequence[str],
    debug: bool,
) -> tuple[Daemon, int]:
    uid, gid = account.pw_uid, account.pw_gid
    owned = {name: state / name for name in ("root", "run", "home", "bin", "rootlesskit")}
    for path in owned.values():
        path.mkdir()
        os.chown(path, uid, gid)
    owned["run"].chmod(0o700)
    for client_dir in ("client-empty-docker-config", "client-home"):
        (state / client_dir).mkdir(mode=0o700)
    # Root-owned and empty: the daemon can read it but never store anything in it.
    docker_config = state / "docker-config"
    docker_config.mkdir(mode=0o755)
    # The cache lives under /root (0700), unreachable for the daemon's user; a hard
    # link (or copy across filesystems) gives it a path it can execute.
    daemon_bin = owned["bin"] / "buildkitd"
    try:
        os.link(buildkitd_bin, daemon_bin)
    except OSError:
        shutil.copy2(buildkitd_bin, daemon_bin)
    config = state / "buildkitd.toml"
    write_config(config, insecure_registries=insecure_registries, mirrors=mirrors, debug=debug)
    config.chmod(0o644)

    port = free_port()
    socket_path = owned["run"] / "buildkitd.sock"
    buildkitd_argv = [
        str(daemon_bin),
        "--config",
        str(config),
        # The production mode: no separate PID namespace per build step, which is what
        # lets buildkitd run unprivileged inside an unprivileged container.
        "--oci-worker-no-process-sandbox",
        "--root",
        str(owned["root"]),
        "--addr",
        f"unix://{socket_path}",
        "--addr",
        f"tcp://127.0.0.1:{port}",
        *extra_args,
    ]
    rootlesskit_argv = [
        rootlesskit,
        # Host network: the registry listens on the host's loopback.
        "--net=host",
        "--copy-up=/etc",
        "--copy-up=/run",
        f"--state-dir={owned['rootlesskit']}",
        *buildkitd_argv,
    ]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv", path=DAEMON_PATH)
        if setpriv is None:
            raise DaemonError("setpriv (util-linux) not found; cannot drop to the daemon user")
        # --init-groups drops root's supplementary groups along with uid and gid.
        argv = [setpriv, f"--reuid={uid}", f"--regid={gid}", "--init-groups", *rootlesskit_argv]
    else:
        argv = rootlesskit_argv
    env = {
        "PATH": DAEMON_PATH,
        # buildkitd switches to its rootless defaults only if USER is set and not root.
        "USER": account.pw_name,
        "LOGNAME": account.pw_name,
        "HOME": str(owned["home"]),
        "XDG_RUNTIME_DIR": str(owned["run"]),
        "DOCKER_CONFIG": str(docker_config),
    }
    daemon = Daemon(name="buildkitd", argv=argv, log_path=log_path, env=env, cwd=state)
    return daemon.start(), port


def prepare_base_context(directory: Path) -> Path:
    """Assemble the busybox base image's build context: the committed Dockerfile plus a
    rootfs made from Debian's busybox-static (the binary is never committed)."""
    if not BUSYBOX_BINARY.exists():
        raise DaemonError(
            f"{BUSYBOX_BINARY} missing (Debian busybox-static); run scripts/install-testbed.sh apt"
        )
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy2(BASE_IMAGE_CONTEXT / "Dockerfile", directory / "Dockerfile")
    rootfs = directory / "rootfs"
    for sub in ("bin", "etc", "tmp", "root", "srv"):
        (rootfs / sub).mkdir(parents=True, exist_ok=True)
    (rootfs / "tmp").chmod(0o1777)
    shutil.copy2(BUSYBOX_BINARY, rootfs / "bin" / "busybox")
    listed = subprocess.run(
        [str(BUSYBOX_BINARY), "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    # Only applets this busybox build really has: a dangling one would fail at RUN time.
    for applet in (name for name in BUSYBOX_APPLETS if name in listed):
        link = rootfs / "bin" / applet
        if not link.is_symlink():
            link.symlink_to("busybox")
    for name in ("passwd", "group"):
        shutil.copy2(BASE_IMAGE_CONTEXT / name, rootfs / "etc" / name)
    return directory


def dockerfile_build_args(context: Path, *output: str) -> list[str]:
    """`buildctl build` arguments for the Dockerfile in `context`, also the build context."""
    return [
        "build",
        "--frontend",
        "dockerfile.v0",
        "--local",
        f"context={context}",
        "--local",
        f"dockerfile={context}",
        *output,
    ]


def build_base_image(kit: BuildKit, ref: str, *, docker_config: Path, workdir: Path) -> str:
    """Build the busybox base image offline and push it as `ref`; returns its digest."""
    context = prepare_base_context(workdir / "busybox-base-context")
    metadata = workdir / "busybox-base-metadata.json"
    kit.buildctl(
        *dockerfile_build_args(context),
        "--output",
        f"type=image,name={ref},push=true",
        "--metadata-file",
        str(metadata),
        docker_config=docker_config,
    )
    return read_image_digest(metadata)


def read_image_digest(metadata_file: Path) -> str:
    """The pushed manifest digest from a `buildctl --metadata-file` JSON file."""
    data = json.loads(metadata_file.read_text())
    digest = data.get("containerimage.digest")
    if not isinstance(digest, str) or not digest.startswith("sha256:"):
        raise DaemonError(f"no image digest in {metadata_file}: {data}")
    return digest
