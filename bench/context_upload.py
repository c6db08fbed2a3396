"""Context upload and end-to-end solve: our Python client against buildctl, in one run.

Both clients drive the SAME rootless buildkitd with the SAME marshalled LLB (ours,
from `build_runner.llb`) and the same context directory, so the only difference is
the client: our `BuildkitClient` + `Session` (FileSync sender, Auth) versus the Go
client in `buildctl`. buildctl reads a raw `pb.Definition` on stdin when no
`--frontend` is given, so we feed it our own bytes instead of a Dockerfile: the
Dockerfile frontend would add a frontend solve, a Dockerfile transfer and a
different graph to buildctl's side only.

Scenarios:

- `upload`: the LLB's result is the `local://context` source itself, no exporter.
  The solve returns once the daemon has the context snapshot, so the time is the
  transfer plus a fixed per-solve overhead.
- `e2e`: FROM the test registry's base image, COPY the context, a RUN step
  (`du -s`), and an image export pushed to the registry with credentials from a
  client-side docker config (both clients read the same directory).

Fairness: before every timed run the daemon's cache is pruned (`Prune all`), so
neither client reuses an earlier upload (the daemon keeps the previous snapshot
per shared key and would otherwise only ask for changed files) or an earlier
build step. The registry keeps blobs between runs for both sides alike; one
untimed warm-up run of each client pays for the first push. The order of the two
clients alternates every repetition. Times are wall clock of the whole client
run: for buildctl the process (connect, session, solve, exit); for Python the
same steps in this process (open channel, attach session, solve, close), without
the interpreter's start-up, as the build runner is one long-lived process. CPU is
the client's user+system time (buildctl: the child's rusage; Python: this
process, all threads). The daemon runs on the same 2 cores, so a client's CPU
slows the daemon too.

Run from the repository root (needs the test bed: scripts/install-testbed.sh):

    .venv/bin/python -m bench.context_upload                # 5,000 files / 100 MiB, 5 reps
    .venv/bin/python -m bench.context_upload --files 1 --mib 100 --reps 5

To see where the Python client's time goes, run it alone under a sampling profiler
that sees every thread (grpc's own threads, file reads in workers), e.g. py-spy
installed ad hoc outside the project's dependencies:

    py-spy record --threads -f raw -o /tmp/upload.folded -- \
        .venv/bin/python -m bench.context_upload --scenario upload --only python --reps 5

It starts its own registry, buildkitd and base image (tests.testbed) and stops
them at the end. The issue's goal is a ratio (python / buildctl) of at most 1.1.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import re
import resource
import secrets
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from build_runner import llb
from build_runner._pb.buildkit import control_pb2, ops_pb2
from build_runner.buildkit.auth import Credentials
from build_runner.buildkit.client import BuildkitClient, ConnectOptions
from build_runner.buildkit.exports import ExportSpec, ImageExport
from build_runner.buildkit.session import Session
from tests.testbed.buildkit import (
    BASE_IMAGE_REPOSITORY,
    BASE_IMAGE_TAG,
    BuildKit,
    build_base_image,
    start_buildkitd,
)
from tests.testbed.contexts import DEFAULT_BYTES, DEFAULT_FILES, DEFAULT_SEED, generate_context
from tests.testbed.registry import Registry, start_registry

# Matches buildctl's plain progress for the transfer, e.g. "transferring context: 100.02MB".
TRANSFER_LINE = re.compile(r"transferring context: ([0-9.]+)([kKMG]?i?B)")
UNIT_BYTES = {
    "B": 1,
    "kB": 1000,
    "KB": 1000,
    "KiB": 1024,
    "MB": 1000**2,
    "MiB": 1024**2,
    "GB": 1000**3,
    "GiB": 1024**3,
}
# A run that transferred less than this share of the context did not do the work.
MIN_TRANSFER_SHARE = 0.9
BUILDCTL_TIMEOUT_S = 600.0
CLIENTS = ("python", "buildctl")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass(frozen=True)
class Sample:
    wall_s: float
    cpu_s: float
    transferred: int
    # buildkitd's own CPU during the run: equal on both sides means equal daemon work.
    daemon_cpu_s: float = 0.0


@dataclasses.dataclass
class Scenario:
    name: str
    definition: ops_pb2.Definition
    # Per run: exporter for our client, --output for buildctl (both may be empty).
    exports: Callable[[str], list[ExportSpec]]
    buildctl_output: Callable[[str], list[str]]


def process_cpu_s(pid: int) -> float:
    """User + system CPU of a process (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # After the comm field: utime and stime are fields 14 and 15 of stat(5).
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _bytes(value: str, unit: str) -> int:
    return int(float(value) * UNIT_BYTES[unit])


class Bench:
    def __init__(
        self, kit: BuildKit, registry: Registry, docker_config: Path, context: Path
    ) -> None:
        self.kit = kit
        self.registry = registry
        self.docker_config = docker_config
        self.context = context
        self.context_bytes = sum(
            st.st_size for p in context.rglob("*") if stat.S_ISREG((st := p.lstat()).st_mode)
        )

    async def prune(self) -> None:
        async with BuildkitClient(ConnectOptions(address=self.kit.address)) as client:
            await client.prune(all=True)

    async def run_python(self, scenario: Scenario, tag: str) -> Sample:
        transferred = 0

        def on_progress(message: control_pb2.StatusResponse) -> None:
            nonlocal transferred
            for status in message.statuses:
                if status.ID.startswith("transferring"):
                    transferred = max(transferred, status.current)

        cpu = time.process_time()
        started = time.perf_counter()
        async with BuildkitClient(ConnectOptions(address=self.kit.address)) as client:
            session = Session(
                credentials=Credentials.from_docker_config_dir(self.docker_config),
                local_dirs={"context": self.context},
            )
            await client.solve(
                scenario.definition,
                session=session,
                exports=scenario.exports(tag),
                on_progress=on_progress,
            )
        wall = time.perf_counter() - started
        return Sample(wall, time.process_time() - cpu, transferred)

    def run_buildctl(self, scenario: Scenario, tag: str) -> Sample:
        argv = [
            "build",
            "--progress=plain",
            "--local",
            f"context={self.context}",
            *scenario.buildctl_output(tag),
        ]
        data = scenario.definition.SerializeToString()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        result = subprocess.run(
            [str(self.kit.buildctl_path), "--addr", self.kit.address, *argv],
            input=data,
            capture_output=True,
            env={"PATH": "/usr/bin:/bin", "DOCKER_CONFIG": str(self.docker_config)},
            timeout=BUILDCTL_TIMEOUT_S,
            check=False,
        )
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        stderr = result.stderr.decode(errors="replace")
        if result.returncode != 0:
            raise RuntimeError(f"buildctl failed ({result.returncode}):\n{stderr[-3000:]}")
        sizes = [_bytes(v, u) for v, u in TRANSFER_LINE.findall(stderr)]
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return Sample(wall, cpu, max(sizes, default=0))

    async def measure(
        self, scenario: Scenario, reps: int, clients: Sequence[str] = CLIENTS
    ) -> dict[str, list[Sample]]:
        samples: dict[str, list[Sample]] = {client: [] for client in clients}

        async def one(client: str, timed: bool) -> None:
            await self.prune()
            tag = f"{scenario.name}-{client}-{secrets.token_hex(4)}"
            daemon_before = process_cpu_s(self.kit.pid)
            if client == "python":
                sample = await self.run_python(scenario, tag)
            else:
                sample = await asyncio.to_thread(self.run_buildctl, scenario, tag)
            daemon_cpu = process_cpu_s(self.kit.pid) - daemon_before
            sample = dataclasses.replace(sample, daemon_cpu_s=daemon_cpu)
            if sample.transferred < MIN_TRANSFER_SHARE * self.context_bytes:
                raise RuntimeError(
                    f"{client} transferred {sample.transferred} of {self.context_bytes} bytes: "
                    "the run did not upload the context"
                )
            print(
                f"  {scenario.name:6} {client:8} {'' if timed else '(warm-up) '}"
                f"wall {sample.wall_s:6.2f}s cpu {sample.cpu_s:6.2f}s "
                f"daemon cpu {sample.daemon_cpu_s:6.2f}s "
                f"sent {sample.transferred / 2**20:7.1f} MiB",
                flush=True,
            )
            if timed:
                samples[client].append(sample)

        for client in clients:
            await one(client, timed=False)
        for rep in range(reps):
            for client in clients if rep % 2 == 0 else reversed(clients):
                await one(client, timed=True)
        return samples


def scenarios(base_image: str, registry: Registry, platform: llb.Platform) -> list[Scenario]:
    context = llb.local("context", shared_key_hint="context", custom_name="context")
    upload = Scenario(
        name="upload",
        definition=llb.marshal(context),
        exports=lambda tag: [],
        buildctl_output=lambda tag: [],
    )
    copied = (
        llb.image(base_image, platform=platform, name="base")
        .add_env("PATH", "/bin")
        .file(
            llb.copy(
                context,
                "/",
                "/app/",
                dir_copy_contents=True,
                follow_symlinks=True,
                create_dest_path=True,
                allow_wildcard=True,
                allow_empty_wildcard=True,
            ),
            name="COPY context /app/",
        )
        .run("du -s /app > /app-size", name="du")
    )

    def ref(tag: str) -> str:
        return registry.ref("bench/e2e", tag)

    e2e = Scenario(
        name="e2e",
        definition=llb.marshal(copied, platform=platform),
        exports=lambda tag: [ImageExport(names=[ref(tag)], push=True)],
        buildctl_output=lambda tag: ["--output", f"type=image,name={ref(tag)},push=true"],
    )
    return [upload, e2e]


def report(name: str, samples: dict[str, list[Sample]]) -> str:
    py = [s.wall_s for s in samples["python"]]
    ctl = [s.wall_s for s in samples["buildctl"]]
    py_cpu = [s.cpu_s for s in samples["python"]]
    ctl_cpu = [s.cpu_s for s in samples["buildctl"]]
    ratios = [p / c for p, c in zip(py, ctl, strict=True)]
    py_daemon = statistics.median(s.daemon_cpu_s for s in samples["python"])
    ctl_daemon = statistics.median(s.daemon_cpu_s for s in samples["buildctl"])
    return (
        f"{name:6} wall median python {statistics.median(py):6.2f}s "
        f"buildctl {statistics.median(ctl):6.2f}s "
        f"ratio {statistics.median(py) / statistics.median(ctl):4.2f} "
        f"(per-rep ratios {', '.join(f'{r:.2f}' for r in ratios)}) | "
        f"client cpu median python {statistics.median(py_cpu):5.2f}s "
        f"buildctl {statistics.median(ctl_cpu):5.2f}s "
        f"ratio {statistics.median(py_cpu) / max(statistics.median(ctl_cpu), 1e-9):4.2f} | "
        f"daemon cpu median with python {py_daemon:5.2f}s with buildctl {ctl_daemon:5.2f}s"
    )


async def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.context_upload", description=__doc__)
    parser.add_argument("--files", type=int, default=DEFAULT_FILES)
    parser.add_argument("--mib", type=float, default=DEFAULT_BYTES / 2**20)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--scenario", choices=["upload", "e2e", "all"], default="all")
    parser.add_argument(
        "--only", choices=CLIENTS, help="run one client only (e.g. under a sampling profiler)"
    )
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="lucity-bench-"))
    registry: Registry | None = None
    kit: BuildKit | None = None
    try:
        context = work / "context"
        stats = generate_context(
            context, seed=args.seed, files=args.files, total_bytes=int(args.mib * 2**20)
        )
        print(
            f"context: {stats.files} files, {stats.bytes / 2**20:.1f} MiB, "
            f"{stats.symlinks} symlinks, {stats.empty_dirs} empty dirs"
        )
        registry = start_registry(work / "registry")
        kit = start_buildkitd(insecure_registries=[registry.host], log_path=work / "bk.log")
        docker_config = work / "client-docker-config"
        registry.write_docker_config(docker_config)
        base_image = registry.ref(BASE_IMAGE_REPOSITORY, BASE_IMAGE_TAG)
        build_base_image(kit, base_image, docker_config=docker_config, workdir=work / "base")
        async with BuildkitClient(ConnectOptions(address=kit.address)) as client:
            platform = await client.default_platform()
        bench = Bench(kit, registry, docker_config, context)
        chosen = [
            s for s in scenarios(base_image, registry, platform) if args.scenario in ("all", s.name)
        ]
        clients = [args.only] if args.only else list(CLIENTS)
        lines = []
        for scenario in chosen:
            samples = await bench.measure(scenario, args.reps, clients)
            if not args.only:
                lines.append(report(scenario.name, samples))
        if lines:
            print(f"\nresults ({args.reps} reps, medians; ratio = python / buildctl):")
        for line in lines:
            print(line)
        return 0
    finally:
        if kit is not None:
            kit.stop()
        if registry is not None:
            registry.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
