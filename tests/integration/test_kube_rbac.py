"""RBAC of the chart's ServiceAccounts, checked by the real API server.

Every case is a real request with a real ServiceAccount token; the expected code is
what kube-apiserver answers. 403 means RBAC denied; 404 (or 400 for pods/log) means
RBAC allowed and the request failed later for lack of an object or a node.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client, watch

from tests.integration.kube_jobs import build_job, status_of
from tests.testbed.kube_fixtures import Identities, LucityCluster

# One request made with an identity's client, given the cluster's names and the
# names of the suspended Jobs from the `jobs` fixture ("target", "other").
Probe = Callable[[client.ApiClient, LucityCluster, dict[str, str]], Awaitable[Any]]

SECRET = client.V1Secret(metadata=client.V1ObjectMeta(name="probe"), string_data={"k": "v"})
CONFIG_MAP = client.V1ConfigMap(metadata=client.V1ObjectMeta(name="probe"), data={"k": "v"})
POD = client.V1Pod(
    metadata=client.V1ObjectMeta(name="probe"),
    spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="busybox")]),
)
ANNOTATION_PATCH = {"metadata": {"annotations": {"builds.lucity.dev/report": "{}"}}}


def _job(cluster: LucityCluster, namespace: str | None = None) -> Any:
    # Suspended: the Job controller creates no pod, so nothing else reacts to it.
    return build_job(
        f"rbac-{uuid.uuid4().hex[:8]}",
        namespace=namespace or cluster.builds_namespace,
        service_account=cluster.build_job_service_account,
        command=["true"],
        suspend=True,
    )


def core(api: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api)


def batch(api: client.ApiClient) -> client.BatchV1Api:
    return client.BatchV1Api(api)


# What lucity-build-job must be refused. "target" is a suspended Job the admin made
# in the builds namespace; "other" one in the system namespace.
BUILD_JOB_DENIED: list[tuple[str, Probe]] = [
    ("list secrets", lambda a, c, j: core(a).list_namespaced_secret(c.builds_namespace)),
    ("get secret", lambda a, c, j: core(a).read_namespaced_secret("probe", c.builds_namespace)),
    ("create secret", lambda a, c, j: core(a).create_namespaced_secret(c.builds_namespace, SECRET)),
    ("list configmaps", lambda a, c, j: core(a).list_namespaced_config_map(c.builds_namespace)),
    (
        "get configmap",
        lambda a, c, j: core(a).read_namespaced_config_map("kube-root-ca.crt", c.builds_namespace),
    ),
    (
        "create configmap",
        lambda a, c, j: core(a).create_namespaced_config_map(c.builds_namespace, CONFIG_MAP),
    ),
    ("list pods", lambda a, c, j: core(a).list_namespaced_pod(c.builds_namespace)),
    ("get pod", lambda a, c, j: core(a).read_namespaced_pod("probe", c.builds_namespace)),
    ("create pod", lambda a, c, j: core(a).create_namespaced_pod(c.builds_namespace, POD)),
    ("pod logs", lambda a, c, j: core(a).read_namespaced_pod_log("probe", c.builds_namespace)),
    ("create job", lambda a, c, j: batch(a).create_namespaced_job(c.builds_namespace, _job(c))),
    ("delete job", lambda a, c, j: batch(a).delete_namespaced_job(j["target"], c.builds_namespace)),
    ("list jobs elsewhere", lambda a, c, j: batch(a).list_namespaced_job(c.system_namespace)),
    (
        "get job elsewhere",
        lambda a, c, j: batch(a).read_namespaced_job(j["other"], c.system_namespace),
    ),
    (
        "patch job elsewhere",
        lambda a, c, j: batch(a).patch_namespaced_job(
            j["other"], c.system_namespace, ANNOTATION_PATCH
        ),
    ),
    ("list jobs in default", lambda a, c, j: batch(a).list_namespaced_job("default")),
    ("list jobs cluster-wide", lambda a, c, j: batch(a).list_job_for_all_namespaces()),
    ("list namespaces", lambda a, c, j: core(a).list_namespace()),
]

BUILD_JOB_ALLOWED: list[tuple[str, Probe]] = [
    ("list jobs", lambda a, c, j: batch(a).list_namespaced_job(c.builds_namespace)),
    ("get job", lambda a, c, j: batch(a).read_namespaced_job(j["target"], c.builds_namespace)),
    # Patching is allowed by RBAC but narrowed by the chart's admission policy to the
    # Job owning the caller's pod: test_kube_admission.py, with pod-bound tokens.
]


@pytest.fixture(scope="module")
async def jobs(lucity_cluster: LucityCluster, kube_admin: client.ApiClient) -> dict[str, str]:
    """Suspended Jobs made by the admin: one in the builds, one in the system namespace."""
    target = await batch(kube_admin).create_namespaced_job(
        lucity_cluster.builds_namespace, _job(lucity_cluster)
    )
    other = await batch(kube_admin).create_namespaced_job(
        lucity_cluster.system_namespace, _job(lucity_cluster, lucity_cluster.system_namespace)
    )
    return {"target": target.metadata.name, "other": other.metadata.name}


@pytest.fixture(scope="module")
async def build_job_api(
    lucity_cluster: LucityCluster, kube_identities: Identities
) -> client.ApiClient:
    return await kube_identities.client_for(
        lucity_cluster.builds_namespace, lucity_cluster.build_job_service_account
    )


@pytest.fixture(scope="module")
async def builder_api(
    lucity_cluster: LucityCluster, kube_identities: Identities
) -> client.ApiClient:
    return await kube_identities.client_for(
        lucity_cluster.system_namespace, lucity_cluster.builder_service_account
    )


async def test_canary_unbound_service_account_is_forbidden(
    lucity_cluster: LucityCluster, kube_identities: Identities, kube_admin: client.ApiClient
) -> None:
    """If this passed vacuously (200), authorization would not be RBAC at all."""
    name = f"unbound-{uuid.uuid4().hex[:6]}"
    await core(kube_admin).create_namespaced_service_account(
        lucity_cluster.builds_namespace,
        client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=name)),
    )
    unbound = await kube_identities.client_for(lucity_cluster.builds_namespace, name)
    # The token itself is valid: the API server knows who we are...
    review = await client.AuthenticationV1Api(unbound).create_self_subject_review(
        client.V1SelfSubjectReview()
    )
    assert review.status.user_info.username == (
        f"system:serviceaccount:{lucity_cluster.builds_namespace}:{name}"
    )
    # ...and still refuses everything the chart's roles grant to others.
    assert (
        await status_of(batch(unbound).list_namespaced_job(lucity_cluster.builds_namespace)) == 403
    )
    assert (
        await status_of(core(unbound).list_namespaced_pod(lucity_cluster.builds_namespace)) == 403
    )


@pytest.mark.parametrize(
    ("what", "request_"), BUILD_JOB_DENIED, ids=[w for w, _ in BUILD_JOB_DENIED]
)
async def test_build_job_is_forbidden(
    what: str,
    request_: Probe,
    build_job_api: client.ApiClient,
    lucity_cluster: LucityCluster,
    jobs: dict[str, str],
) -> None:
    assert await status_of(request_(build_job_api, lucity_cluster, jobs)) == 403, what


@pytest.mark.parametrize(
    ("what", "request_"), BUILD_JOB_ALLOWED, ids=[w for w, _ in BUILD_JOB_ALLOWED]
)
async def test_build_job_is_allowed(
    what: str,
    request_: Probe,
    build_job_api: client.ApiClient,
    lucity_cluster: LucityCluster,
    jobs: dict[str, str],
) -> None:
    assert await status_of(request_(build_job_api, lucity_cluster, jobs)) == 200, what


async def test_builder_manages_jobs_and_reads_pods(
    builder_api: client.ApiClient, lucity_cluster: LucityCluster
) -> None:
    ns = lucity_cluster.builds_namespace
    job = _job(lucity_cluster)
    name = job["metadata"]["name"]
    assert await status_of(batch(builder_api).create_namespaced_job(ns, job)) == 200
    assert await status_of(batch(builder_api).read_namespaced_job(name, ns)) == 200
    assert await status_of(batch(builder_api).list_namespaced_job(ns, watch=False)) == 200
    assert await status_of(core(builder_api).list_namespaced_pod(ns)) == 200
    # Allowed by RBAC, then 404 for want of the pod (a denied request would be 403).
    assert await status_of(core(builder_api).read_namespaced_pod_log("no-such-pod", ns)) == 404
    assert await status_of(batch(builder_api).delete_namespaced_job(name, ns)) == 200


async def _watch_events(list_call: Any, namespace: str) -> list[dict[str, Any]]:
    """Every event of a watch that the server ends after a second."""
    async with watch.Watch() as stream:
        return [event async for event in stream.stream(list_call, namespace, timeout_seconds=1)]


async def test_builder_may_watch_jobs_and_pods(
    builder_api: client.ApiClient, lucity_cluster: LucityCluster
) -> None:
    """A watch is its own verb: the streams open, and show the builder's Job."""
    ns = lucity_cluster.builds_namespace
    job = _job(lucity_cluster)
    await batch(builder_api).create_namespaced_job(ns, job)
    name = job["metadata"]["name"]
    jobs = await _watch_events(batch(builder_api).list_namespaced_job, ns)
    assert ("ADDED", name) in [(e["type"], e["object"].metadata.name) for e in jobs]
    await _watch_events(core(builder_api).list_namespaced_pod, ns)
    await batch(builder_api).delete_namespaced_job(name, ns)
    # Outside the builds namespace a watch is refused like a list.
    with pytest.raises(client.ApiException) as refused:
        await _watch_events(batch(builder_api).list_namespaced_job, "default")
    assert refused.value.status == 403


async def test_builder_secrets_are_write_only(
    builder_api: client.ApiClient, lucity_cluster: LucityCluster
) -> None:
    """Per-build git-token Secrets: the builder may create and delete, never read."""
    ns = lucity_cluster.builds_namespace
    name = f"git-token-{uuid.uuid4().hex[:8]}"
    secret = client.V1Secret(metadata=client.V1ObjectMeta(name=name), string_data={"token": "t"})
    assert await status_of(core(builder_api).create_namespaced_secret(ns, secret)) == 200
    assert await status_of(core(builder_api).read_namespaced_secret(name, ns)) == 403
    assert await status_of(core(builder_api).list_namespaced_secret(ns)) == 403
    assert (
        await status_of(
            core(builder_api).patch_namespaced_secret(name, ns, {"stringData": {"k": "x"}})
        )
        == 403
    )
    assert await status_of(core(builder_api).delete_namespaced_secret(name, ns)) == 200


BUILDER_DENIED: list[tuple[str, Probe]] = [
    (
        "patch job",
        lambda a, c, j: batch(a).patch_namespaced_job(
            j["target"], c.builds_namespace, ANNOTATION_PATCH
        ),
    ),
    ("jobs in system namespace", lambda a, c, j: batch(a).list_namespaced_job(c.system_namespace)),
    (
        "secrets in system namespace",
        lambda a, c, j: core(a).list_namespaced_secret(c.system_namespace),
    ),
    ("configmaps", lambda a, c, j: core(a).list_namespaced_config_map(c.builds_namespace)),
    ("create pod", lambda a, c, j: core(a).create_namespaced_pod(c.builds_namespace, POD)),
    ("delete pod", lambda a, c, j: core(a).delete_namespaced_pod("probe", c.builds_namespace)),
    ("list jobs cluster-wide", lambda a, c, j: batch(a).list_job_for_all_namespaces()),
]


@pytest.mark.parametrize(("what", "request_"), BUILDER_DENIED, ids=[w for w, _ in BUILDER_DENIED])
async def test_builder_is_forbidden(
    what: str,
    request_: Probe,
    builder_api: client.ApiClient,
    lucity_cluster: LucityCluster,
    jobs: dict[str, str],
) -> None:
    assert await status_of(request_(builder_api, lucity_cluster, jobs)) == 403, what


async def test_separate_process_acts_as_service_account_via_kubeconfig(
    tmp_path: Path, lucity_cluster: LucityCluster, kube_identities: Identities
) -> None:
    """Identities.kubeconfig_for: another process authenticates as lucity-build-job."""
    ns = lucity_cluster.builds_namespace
    kubeconfig = await kube_identities.kubeconfig_for(
        ns, lucity_cluster.build_job_service_account, tmp_path / "build-job.kubeconfig"
    )
    script = (
        "import asyncio, sys\n"
        "from kubernetes_asyncio import client, config\n"
        "async def main():\n"
        "    api = await config.new_client_from_config(config_file=sys.argv[1])\n"
        "    async with api:\n"
        "        await client.BatchV1Api(api).list_namespaced_job(sys.argv[2])\n"
        "        print('jobs: ok')\n"
        "        try:\n"
        "            await client.CoreV1Api(api).list_namespaced_secret(sys.argv[2])\n"
        "        except client.ApiException as exc:\n"
        "            print('secrets:', exc.status)\n"
        "asyncio.run(main())\n"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        str(kubeconfig),
        ns,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, output.decode()
    assert output.decode().splitlines() == ["jobs: ok", "secrets: 403"]
