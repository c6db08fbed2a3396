"""Start, watch and stop the test bed's daemons as plain local processes.

Owns: locating the version-pinned binaries built by scripts/install-testbed.sh,
free loopback ports, and a `Daemon` handle that captures a process's output to a
log file, waits for readiness with a bounded deadline and kills the whole
process group on teardown. It never skips: a daemon that can't start raises
`DaemonError` with the tail of its log, so the test run fails loudly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VERSIONS_FILE = REPO / "scripts" / "versions.env"


class DaemonError(RuntimeError):
    """A test-bed daemon could not be found, started, or made ready."""


def cache_dir() -> Path:
    """Where scripts/install-testbed.sh keeps its builds (outside git)."""
    if env := os.environ.get("LUCITY_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lucity-builder"


def pinned_versions() -> dict[str, str]:
    """The versions in scripts/versions.env, e.g. {"BUILDKIT_VERSION": "v0.32.2"}."""
    versions: dict[str, str] = {}
    for line in VERSIONS_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            versions[key.strip()] = value.strip()
    return versions


def binary(component: str, name: str) -> Path:
    """Path of a cached binary, e.g. binary("buildkit", "buildkitd"); raises if not built."""
    # versions.env spells Kubernetes "K8S"; every other component by its own name.
    key = "K8S_VERSION" if component == "kubernetes" else f"{component.upper()}_VERSION"
    version = pinned_versions()[key]
    path = cache_dir() / "bin" / component / version / name
    if not os.access(path, os.X_OK):
        raise DaemonError(
            f"{name} {version} is not installed at {path}; run scripts/install-testbed.sh"
        )
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """True if something accepts TCP connections on host:port."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


@dataclass
class Daemon:
    """One running daemon process, its log file, and how to stop it."""

    name: str
    argv: Sequence[str]
    log_path: Path
    env: Mapping[str, str] | None = None
    cwd: Path | None = None
    user: str | int | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> Daemon:
        """Start the process in its own process group, output appended to log_path."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        try:
            self.process = subprocess.Popen(
                list(self.argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(self.env) if self.env is not None else None,
                cwd=self.cwd,
                user=self.user,
                start_new_session=True,
            )
        except OSError as exc:
            raise DaemonError(f"{self.name}: cannot start {self.argv[0]}: {exc}") from exc
        finally:
            log.close()
        return self

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the daemon's log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, probe: Callable[[], bool], *, timeout_s: float = 30.0) -> None:
        """Poll probe() until it returns True; fail with the log tail if the process
        exits or the deadline passes."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise DaemonError(
                    f"{self.name} exited with {self.process.returncode} before it was ready; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            with contextlib.suppress(Exception):
                if probe():
                    return
            if time.monotonic() > deadline:
                raise DaemonError(
                    f"{self.name} not ready after {timeout_s:.0f}s; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def stop(self, *, grace_s: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL it if it lingers."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=grace_s)
