"""Session-scoped pytest fixtures: the authenticating registry, rootless buildkitd, and
an offline busybox base image in that registry.

Owns only fixture wiring (lifetimes, where logs go); starting and stopping the daemons
lives in tests/testbed/buildkit.py and registry.py. A daemon that cannot start raises
DaemonError and fails every test that asked for it: nothing skips.
Tests using these fixtures get the `buildkit` marker automatically.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.testbed.buildkit import (
    BASE_IMAGE_REPOSITORY,
    BASE_IMAGE_TAG,
    MIRRORED_REGISTRIES,
    BuildKit,
    build_base_image,
    start_buildkitd,
)
from tests.testbed.registry import Registry, start_registry

BUILDKIT_FIXTURES = frozenset(
    {"registry", "buildkitd", "registry_docker_config", "empty_docker_config", "base_image"}
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses the BuildKit test bed, so `-m "not buildkit"` works."""
    for item in items:
        if BUILDKIT_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.buildkit)


def _report_startup(config: pytest.Config, what: str, seconds: float) -> None:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        return
    # Fixture setup runs with output captured; start-up times belong on the terminal.
    with capture.global_and_fixture_disabled():
        reporter.write_line(f"[testbed] {what} in {seconds:.2f}s")


@pytest.fixture(scope="session")
def registry(
    tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[Registry]:
    """docker-registry with htpasswd auth on a free 127.0.0.1 port."""
    workdir = tmp_path_factory.mktemp("registry")
    started = time.monotonic()
    running = start_registry(workdir)
    _report_startup(pytestconfig, f"registry {running.host} ready", time.monotonic() - started)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def buildkitd(
    registry: Registry, tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[BuildKit]:
    """Rootless buildkitd (no process sandbox) as the unprivileged test-bed user; docker.io
    and ghcr.io are mirrored by the test registry."""
    logs = tmp_path_factory.mktemp("buildkitd-log")
    started = time.monotonic()
    # The log goes to pytest's tmp dir, which outlives the daemon's own state dir.
    running = start_buildkitd(
        insecure_registries=[registry.host],
        mirrors={public: [registry.host] for public in MIRRORED_REGISTRIES},
        log_path=logs / "buildkitd.log",
    )
    _report_startup(pytestconfig, f"buildkitd {running.address} ready", time.monotonic() - started)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def registry_docker_config(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CLIENT-side DOCKER_CONFIG directory holding the registry's credentials."""
    directory = tmp_path_factory.mktemp("client-docker-config")
    registry.write_docker_config(directory)
    return directory


@pytest.fixture(scope="session")
def empty_docker_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CLIENT-side DOCKER_CONFIG directory with no credentials at all."""
    return tmp_path_factory.mktemp("client-empty-docker-config")


@pytest.fixture(scope="session")
def base_image(
    buildkitd: BuildKit,
    registry: Registry,
    registry_docker_config: Path,
    tmp_path_factory: pytest.TempPathFactory,
    pytestconfig: pytest.Config,
) -> str:
    """Full reference of the offline busybox base image, pushed to the test registry
    (pulling it needs the registry's credentials, like any image there)."""
    ref = registry.ref(BASE_IMAGE_REPOSITORY, BASE_IMAGE_TAG)
    started = time.monotonic()
    build_base_image(
        buildkitd,
        ref,
        docker_config=registry_docker_config,
        workdir=tmp_path_factory.mktemp("base-image"),
    )
    _report_startup(pytestconfig, f"base image {ref} pushed", time.monotonic() - started)
    return ref
