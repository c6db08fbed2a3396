"""`python -m tests.testbed up`: the BuildKit test bed in the foreground, for people.

Owns only the command line: start the registry, rootless buildkitd and the busybox
base image (the same code the pytest fixtures use), print where they are, optionally
write a shell-sourceable env file for scripts (scripts/demo.sh), then wait for
Ctrl-C or SIGTERM and stop everything. Exits non-zero if a daemon dies meanwhile.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from tests.testbed.buildkit import (
    BASE_IMAGE_REPOSITORY,
    BASE_IMAGE_TAG,
    MIRRORED_REGISTRIES,
    BuildKit,
    build_base_image,
    start_buildkitd,
)
from tests.testbed.process import DaemonError
from tests.testbed.registry import Registry, start_registry

# How often the foreground loop checks that both daemons are still alive.
WATCH_INTERVAL_S = 1.0


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.testbed", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start buildkitd + registry until Ctrl-C/SIGTERM")
    up.add_argument("--env-file", type=Path, help="write LUCITY_* shell variables here once ready")
    up.add_argument("--workdir", type=Path, help="registry storage, logs, client config")
    up.add_argument("--no-base-image", action="store_true", help="skip pushing the base image")
    up.add_argument("--keep", action="store_true", help="keep the workdir after stopping")
    return parser.parse_args(argv)


def _environment(
    kit: BuildKit, registry: Registry, client_config: Path, base_image: str | None
) -> dict[str, str]:
    env = {
        "LUCITY_BUILDKIT_ADDR": kit.address,
        "LUCITY_BUILDKIT_TCP_ADDR": kit.tcp_address,
        "LUCITY_BUILDCTL": str(kit.buildctl_path),
        "LUCITY_BUILDKIT_LOG": str(kit.log_path),
        "LUCITY_REGISTRY": registry.host,
        "LUCITY_REGISTRY_USERNAME": registry.username,
        # A client-side DOCKER_CONFIG directory; the password is only in its config.json.
        "LUCITY_REGISTRY_DOCKER_CONFIG": str(client_config),
        "LUCITY_REGISTRY_LOG": str(registry.log_path),
        "LUCITY_BUILDKIT_PID": str(kit.pid),
        "LUCITY_REGISTRY_PID": str(registry.pid),
    }
    if base_image:
        env["LUCITY_BASE_IMAGE"] = base_image
    return env


def _write_env_file(path: Path, env: dict[str, str]) -> None:
    # Written whole then renamed, so a script polling for the file never reads half of it.
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(f"{key}={shlex.quote(value)}\n" for key, value in env.items()))
    partial.chmod(0o600)
    partial.replace(path)


class _StopRequested(Exception):
    """SIGINT or SIGTERM arrived: unwind to the cleanup in `up`."""


def _request_stop(signum: int, _frame: object) -> None:
    # Raising from the handler also interrupts a start-up in progress, and the
    # `finally` in `up` then stops whatever had started. Handlers are not inherited
    # across exec, so the daemons keep their default signal behaviour.
    raise _StopRequested(signal.Signals(signum).name)


def _wait_for_stop(kit: BuildKit, registry: Registry) -> str | None:
    """Block until SIGINT/SIGTERM (returns None) or a daemon dies (returns its name)."""
    try:
        while True:
            time.sleep(WATCH_INTERVAL_S)
            for name, daemon in (("buildkitd", kit.daemon), ("registry", registry.daemon)):
                if daemon.process is not None and daemon.process.poll() is not None:
                    return name
    except _StopRequested:
        return None


def up(args: argparse.Namespace) -> int:
    """Run the test bed until asked to stop; 0 on a clean stop."""
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lucity-testbed-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, _request_stop)
    registry: Registry | None = None
    kit: BuildKit | None = None
    failed = True
    try:
        registry = start_registry(workdir / "registry")
        kit = start_buildkitd(
            insecure_registries=[registry.host],
            mirrors={public: [registry.host] for public in MIRRORED_REGISTRIES},
            log_path=workdir / "buildkitd.log",
        )
        client_config = workdir / "client-docker-config"
        registry.write_docker_config(client_config)
        base_image = None
        if not args.no_base_image:
            base_image = registry.ref(BASE_IMAGE_REPOSITORY, BASE_IMAGE_TAG)
            build_base_image(kit, base_image, docker_config=client_config, workdir=workdir)
        env = _environment(kit, registry, client_config, base_image)
        print(f"test bed ready in {time.monotonic() - started:.1f}s (workdir {workdir})")
        for key, value in env.items():
            print(f"  {key}={value}")
        print(f"  buildkitd pid {kit.pid} as user {kit.user}; Ctrl-C or SIGTERM stops it")
        sys.stdout.flush()
        if args.env_file:
            _write_env_file(args.env_file, env)
        died = _wait_for_stop(kit, registry)
        if died:
            log = kit.log_path if died == "buildkitd" else registry.log_path
            print(f"{died} exited unexpectedly; log {log}", file=sys.stderr)
            return 1
        failed = False
        return 0
    except DaemonError as exc:
        print(f"test bed failed to start: {exc}", file=sys.stderr)
        return 1
    except _StopRequested:
        print("stop requested during start-up", file=sys.stderr)
        return 1
    finally:
        # A second Ctrl-C must not cut the cleanup short and orphan a daemon.
        for stop_signal in (signal.SIGINT, signal.SIGTERM):
            signal.signal(stop_signal, signal.SIG_IGN)
        if kit is not None:
            kit.stop()
        if registry is not None:
            registry.stop()
        if args.env_file:
            args.env_file.unlink(missing_ok=True)
        if failed or args.keep:
            print(f"stopped; logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
            print("stopped", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m tests.testbed`."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    if args.command == "up":
        return up(args)
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main())
