"""Session-scoped pytest fixtures for the real Kubernetes control plane.

Owns only fixture wiring: one etcd + kube-apiserver + kube-controller-manager per test
session (tests/testbed/kube.py), the Helm chart from deploy/ applied to it, clients per
identity, and the fake kubelet (tests/testbed/node.py). A daemon that cannot start
raises DaemonError and fails every test that asked for it: nothing skips.
Tests using these fixtures get the `kube` marker automatically.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml
from kubernetes_asyncio import client

from tests.testbed.kube import CHART_DIR, ControlPlane, apply_objects, mint_token, render_chart
from tests.testbed.node import FakeKubelet
from tests.testbed.process import DaemonError

KUBE_FIXTURES = frozenset(
    {"kube_control_plane", "kube_admin", "lucity_cluster", "kube_identities", "fake_kubelet"}
)
# Controllers start their informers a moment after the apiserver is ready; on a
# loaded 2-core CI machine that has taken a few seconds, so allow a generous bound.
CONTROLLERS_READY_TIMEOUT_S = 60.0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses the Kubernetes test bed, so `-m "not kube"` works."""
    for item in items:
        if KUBE_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.kube)


def _report(config: pytest.Config, line: str) -> None:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"[testbed] {line}")


@dataclass(frozen=True)
class LucityCluster:
    """The chart's namespaces and ServiceAccounts as installed in the test cluster."""

    system_namespace: str
    builds_namespace: str
    builder_service_account: str
    build_job_service_account: str
    objects: list[dict[str, Any]]


@dataclass
class Identities:
    """Clients acting as ServiceAccounts, with tokens from TokenRequest; closed at teardown."""

    plane: ControlPlane
    admin: client.ApiClient
    _clients: list[client.ApiClient] = field(default_factory=list)

    async def token(
        self, namespace: str, service_account: str, *, pod: client.V1Pod | None = None
    ) -> str:
        """A fresh token for namespace/service_account (bound to pod if given)."""
        return await mint_token(
            self.admin, namespace=namespace, service_account=service_account, pod=pod
        )

    async def client_for(
        self, namespace: str, service_account: str, *, pod: client.V1Pod | None = None
    ) -> client.ApiClient:
        """An ApiClient authenticated as system:serviceaccount:namespace:service_account."""
        token = await self.token(namespace, service_account, pod=pod)
        api = client.ApiClient(self.plane.token_configuration(token))
        self._clients.append(api)
        return api

    async def kubeconfig_for(self, namespace: str, service_account: str, path: Path) -> Path:
        """A kubeconfig file for a separate process acting as that ServiceAccount."""
        token = await self.token(namespace, service_account)
        return self.plane.write_token_kubeconfig(
            path, user=f"system:serviceaccount:{namespace}:{service_account}", token=token
        )

    async def close(self) -> None:
        """Close every client handed out."""
        for api in self._clients:
            await api.close()
        self._clients.clear()


async def _wait_for(
    what: str,
    probe: Callable[[], Awaitable[bool]],
    *,
    plane: ControlPlane,
    timeout_s: float = CONTROLLERS_READY_TIMEOUT_S,
) -> None:
    """Poll an async probe until it returns true, or fail with where the logs are."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(client.ApiException):
            if await probe():
                return
        if time.monotonic() > deadline:
            raise DaemonError(
                f"{what} not seen after {timeout_s:.0f}s; logs in {plane.workdir / 'logs'}"
            )
        await asyncio.sleep(0.2)


@pytest.fixture(scope="session")
def kube_control_plane(
    tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[ControlPlane]:
    """etcd, kube-apiserver (Node,RBAC) and kube-controller-manager on loopback."""
    plane = ControlPlane(workdir=tmp_path_factory.mktemp("kube"))
    started = time.monotonic()
    plane.start()
    _report(
        pytestconfig, f"kube control plane {plane.url} ready in {time.monotonic() - started:.2f}s"
    )
    _report(pytestconfig, f"admin kubeconfig: {plane.admin_kubeconfig}")
    yield plane
    plane.stop()


@pytest_asyncio.fixture(scope="session")
async def kube_admin(kube_control_plane: ControlPlane) -> AsyncIterator[client.ApiClient]:
    """An ApiClient as the system:masters admin, once the controllers are working."""
    api = client.ApiClient(kube_control_plane.admin_configuration())
    core = client.CoreV1Api(api)

    async def controllers_working() -> bool:
        # The serviceaccount and root-ca publisher controllers fill every namespace;
        # seeing both in `default` proves the controller manager is authorised and live.
        await core.read_namespaced_service_account("default", "default")
        await core.read_namespaced_config_map("kube-root-ca.crt", "default")
        return True

    await _wait_for(
        "controllers (default ServiceAccount, kube-root-ca.crt)",
        controllers_working,
        plane=kube_control_plane,
    )
    yield api
    await api.close()


@pytest_asyncio.fixture(scope="session")
async def lucity_cluster(
    kube_admin: client.ApiClient, kube_control_plane: ControlPlane
) -> LucityCluster:
    """The Helm chart from deploy/ rendered with `helm template` and applied by the admin."""
    objects = render_chart()
    await apply_objects(kube_admin, objects)
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    cluster = LucityCluster(
        system_namespace=values["namespaces"]["system"],
        builds_namespace=values["namespaces"]["builds"],
        builder_service_account=values["serviceAccounts"]["builder"],
        build_job_service_account=values["serviceAccounts"]["buildJob"],
        objects=objects,
    )
    core = client.CoreV1Api(kube_admin)

    async def namespaces_ready() -> bool:
        # Pods in lucity-builds mount kube-root-ca.crt (kube-api-access volume).
        await core.read_namespaced_config_map("kube-root-ca.crt", cluster.builds_namespace)
        return True

    await _wait_for(
        "kube-root-ca.crt in the builds namespace", namespaces_ready, plane=kube_control_plane
    )
    if any(o["kind"] == "ValidatingAdmissionPolicy" for o in objects):
        await _wait_for_admission_policy(kube_admin, cluster, plane=kube_control_plane)
    return cluster


async def _wait_for_admission_policy(
    admin: client.ApiClient, cluster: LucityCluster, *, plane: ControlPlane
) -> None:
    """Wait until the apiserver enforces the chart's ValidatingAdmissionPolicy.

    Policies take effect a moment after they are created (informer sync). Probe:
    lucity-build-job, with a token bound to no pod, dry-run patches a suspended Job.
    RBAC allows that, so a refusal can only come from the policy.
    """
    ns = cluster.builds_namespace
    probe = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "admission-probe", "namespace": ns},
        "spec": {
            "suspend": True,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "probe", "image": "probe", "command": ["true"]}],
                }
            },
        },
    }
    batch = client.BatchV1Api(admin)
    # Suspended, so it never gets a pod; deleted again below.
    await apply_objects(admin, [probe])
    token = await mint_token(admin, namespace=ns, service_account=cluster.build_job_service_account)
    async with client.ApiClient(plane.token_configuration(token)) as build_job:

        async def enforced() -> bool:
            try:
                await client.BatchV1Api(build_job).patch_namespaced_job(
                    "admission-probe",
                    ns,
                    {"metadata": {"annotations": {"builds.lucity.dev/report": "{}"}}},
                    dry_run="All",
                )
            except client.ApiException as exc:
                return exc.status == 403 and "ValidatingAdmissionPolicy" in str(exc.body)
            return False

        await _wait_for("the chart's ValidatingAdmissionPolicy", enforced, plane=plane)
    await batch.delete_namespaced_job("admission-probe", ns, propagation_policy="Background")


@pytest_asyncio.fixture(scope="session")
async def kube_identities(
    kube_control_plane: ControlPlane, kube_admin: client.ApiClient
) -> AsyncIterator[Identities]:
    """Mint tokens and clients per ServiceAccount (see Identities)."""
    identities = Identities(plane=kube_control_plane, admin=kube_admin)
    yield identities
    await identities.close()


@pytest_asyncio.fixture(scope="session")
async def fake_kubelet(
    kube_control_plane: ControlPlane,
    kube_admin: client.ApiClient,
    lucity_cluster: LucityCluster,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[FakeKubelet]:
    """Runs pods in the builds namespace as local processes, for the whole session."""
    kubelet = FakeKubelet(
        api=kube_admin,
        namespace=lucity_cluster.builds_namespace,
        apiserver_port=kube_control_plane.port,
        workdir=tmp_path_factory.mktemp("pods"),
    )
    task = asyncio.create_task(kubelet.run(), name="fake kubelet")
    yield kubelet
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    if kubelet.errors:
        raise DaemonError(f"the fake kubelet failed: {kubelet.errors!r}") from kubelet.errors[0]
