"""The chart's ValidatingAdmissionPolicy, enforced by the real API server.

RBAC lets lucity-build-job patch any Job in the builds namespace; the policy narrows
that to the Job owning the pod its token is bound to, and to the report annotation.
Two Jobs run at once here, so one build's pod trying to forge the other's report is
a real request.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from kubernetes_asyncio import client

from build_runner.annotate import REPORT_ANNOTATION
from tests.integration.kube_jobs import JOB_NAME_LABEL, delete_job, start_sleeping_job
from tests.testbed.kube_fixtures import Identities, LucityCluster
from tests.testbed.node import FakeKubelet


def _report(text: str) -> dict[str, Any]:
    return {"metadata": {"annotations": {REPORT_ANNOTATION: text}}}


@pytest.fixture(scope="module")
async def two_builds(
    lucity_cluster: LucityCluster, kube_admin: client.ApiClient, fake_kubelet: FakeKubelet
) -> AsyncIterator[tuple[client.V1Pod, client.V1Pod]]:
    """The running pods of two Jobs, A and B (run by the fake kubelet)."""
    ns = lucity_cluster.builds_namespace
    names = [f"adm-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    pods = [
        await start_sleeping_job(
            kube_admin,
            name,
            namespace=ns,
            service_account=lucity_cluster.build_job_service_account,
            annotations={"example.com/keep": "me"},
        )
        for name in names
    ]
    yield pods[0], pods[1]
    for name in names:
        await delete_job(kube_admin, name, namespace=ns)


@pytest.fixture(scope="module")
async def pod_a_jobs(
    two_builds: tuple[client.V1Pod, client.V1Pod],
    lucity_cluster: LucityCluster,
    kube_identities: Identities,
) -> client.BatchV1Api:
    """BatchV1Api as lucity-build-job with a token bound to pod A (what A's runner holds)."""
    api = await kube_identities.client_for(
        lucity_cluster.builds_namespace,
        lucity_cluster.build_job_service_account,
        pod=two_builds[0],
    )
    return client.BatchV1Api(api)


def _job(pod: client.V1Pod) -> str:
    return str(pod.metadata.labels[JOB_NAME_LABEL])


async def _refusal(call: Any) -> str:
    with pytest.raises(client.ApiException) as refused:
        await call
    assert refused.value.status == 403, refused.value.body
    return str(refused.value.body)


async def test_own_job_report_is_allowed(
    pod_a_jobs: client.BatchV1Api,
    two_builds: tuple[client.V1Pod, client.V1Pod],
    lucity_cluster: LucityCluster,
) -> None:
    job = await pod_a_jobs.patch_namespaced_job(
        _job(two_builds[0]), lucity_cluster.builds_namespace, _report('{"phase":"BUILDING"}')
    )
    assert job.metadata.annotations[REPORT_ANNOTATION] == '{"phase":"BUILDING"}'
    assert job.metadata.annotations["example.com/keep"] == "me"


async def test_other_builds_job_is_refused(
    pod_a_jobs: client.BatchV1Api,
    two_builds: tuple[client.V1Pod, client.V1Pod],
    lucity_cluster: LucityCluster,
) -> None:
    body = await _refusal(
        pod_a_jobs.patch_namespaced_job(
            _job(two_builds[1]), lucity_cluster.builds_namespace, _report('{"phase":"FAILED"}')
        )
    )
    assert "only change the Job that owns its own pod" in body


@pytest.mark.parametrize(
    ("what", "patch", "message"),
    [
        ("label", {"metadata": {"labels": {"app": "other"}}}, "spec or labels"),
        ("spec", {"spec": {"activeDeadlineSeconds": 1}}, "spec or labels"),
        (
            "other annotation",
            {"metadata": {"annotations": {"example.com/keep": "changed"}}},
            "only change the builds.lucity.dev/report annotation",
        ),
        (
            "removed annotation",
            {"metadata": {"annotations": {"example.com/keep": None}}},
            "only change the builds.lucity.dev/report annotation",
        ),
    ],
)
async def test_only_the_report_annotation_may_change(
    what: str,
    patch: dict[str, Any],
    message: str,
    pod_a_jobs: client.BatchV1Api,
    two_builds: tuple[client.V1Pod, client.V1Pod],
    lucity_cluster: LucityCluster,
) -> None:
    body = await _refusal(
        pod_a_jobs.patch_namespaced_job(
            _job(two_builds[0]),
            lucity_cluster.builds_namespace,
            patch,
            _content_type="application/merge-patch+json",  # type: ignore[call-arg]
        )
    )
    assert message in body, what


async def test_token_bound_to_no_pod_is_refused(
    two_builds: tuple[client.V1Pod, client.V1Pod],
    lucity_cluster: LucityCluster,
    kube_identities: Identities,
) -> None:
    unbound = await kube_identities.client_for(
        lucity_cluster.builds_namespace, lucity_cluster.build_job_service_account
    )
    await _refusal(
        client.BatchV1Api(unbound).patch_namespaced_job(
            _job(two_builds[0]), lucity_cluster.builds_namespace, _report("{}")
        )
    )


async def test_policy_does_not_bind_other_identities(
    two_builds: tuple[client.V1Pod, client.V1Pod],
    lucity_cluster: LucityCluster,
    kube_admin: client.ApiClient,
) -> None:
    job = await client.BatchV1Api(kube_admin).patch_namespaced_job(
        _job(two_builds[1]),
        lucity_cluster.builds_namespace,
        {"metadata": {"labels": {"checked-by": "admin"}}},
    )
    assert job.metadata.labels["checked-by"] == "admin"
