"""build_runner.annotate against the real API server: merge semantics and error translation.

The runner's reporter is driven in-process with a ServiceAccount directory written
here, exactly as the fake kubelet (or a real one) lays it out.
"""

from __future__ import annotations

import datetime
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from google.protobuf import json_format
from kubernetes_asyncio import client

from build_runner.annotate import (
    REPORT_ANNOTATION,
    SERVICEACCOUNT_DIR_ENV,
    AnnotateForbiddenError,
    ApiUnavailableError,
    InClusterConfig,
    JobNotFoundError,
    KubernetesJobReporter,
    build_report,
)
from builder_service._pb.lucity.builder.v1 import builder_pb2, result_pb2
from tests.integration.kube_jobs import JOB_NAME_LABEL, delete_job, start_sleeping_job
from tests.testbed.kube import ControlPlane
from tests.testbed.kube_fixtures import Identities, LucityCluster
from tests.testbed.node import FakeKubelet
from tests.testbed.process import free_port

NOW = datetime.datetime(2026, 11, 28, 12, 0, tzinfo=datetime.UTC)


def _sa_dir(path: Path, *, token: str, plane: ControlPlane, namespace: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "token").write_text(token)
    (path / "ca.crt").write_bytes(plane.pki.ca.cert.read_bytes())
    (path / "namespace").write_text(namespace)
    return path


def _config(sa_dir: Path, port: int) -> InClusterConfig:
    return InClusterConfig.from_env(
        {
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": str(port),
            SERVICEACCOUNT_DIR_ENV: str(sa_dir),
        }
    )


@pytest.fixture
async def running_build(
    lucity_cluster: LucityCluster, kube_admin: client.ApiClient, fake_kubelet: FakeKubelet
) -> AsyncIterator[client.V1Pod]:
    """A Job whose pod the fake kubelet is running; the chart's admission policy lets
    only a token bound to that pod patch the Job."""
    name = f"annotate-{uuid.uuid4().hex[:8]}"
    pod = await start_sleeping_job(
        kube_admin,
        name,
        namespace=lucity_cluster.builds_namespace,
        service_account=lucity_cluster.build_job_service_account,
        annotations={"example.com/keep": "me"},
    )
    yield pod
    await delete_job(kube_admin, name, namespace=lucity_cluster.builds_namespace)


def _job_of(pod: client.V1Pod) -> str:
    return str(pod.metadata.labels[JOB_NAME_LABEL])


async def test_report_is_merged_into_existing_annotations(
    tmp_path: Path,
    lucity_cluster: LucityCluster,
    kube_identities: Identities,
    kube_control_plane: ControlPlane,
    kube_admin: client.ApiClient,
    running_build: client.V1Pod,
) -> None:
    ns = lucity_cluster.builds_namespace
    job_name = _job_of(running_build)
    token = await kube_identities.token(
        ns, lucity_cluster.build_job_service_account, pod=running_build
    )
    sa_dir = _sa_dir(tmp_path / "sa", token=token, plane=kube_control_plane, namespace=ns)
    report = build_report(
        phase=builder_pb2.BUILD_PHASE_BUILDING, now=NOW, resolved_commit="c0ffee" * 6 + "c0ff"
    )
    async with KubernetesJobReporter(
        _config(sa_dir, kube_control_plane.port), job_name=job_name
    ) as reporter:
        await reporter.publish(report)

    job = await client.BatchV1Api(kube_admin).read_namespaced_job(job_name, ns)
    annotations = job.metadata.annotations
    assert annotations["example.com/keep"] == "me"
    assert json_format.Parse(annotations[REPORT_ANNOTATION], result_pb2.RunnerReport()) == report


async def test_missing_job_is_not_found(
    tmp_path: Path,
    lucity_cluster: LucityCluster,
    kube_identities: Identities,
    kube_control_plane: ControlPlane,
) -> None:
    ns = lucity_cluster.builds_namespace
    token = await kube_identities.token(ns, lucity_cluster.build_job_service_account)
    sa_dir = _sa_dir(tmp_path / "sa", token=token, plane=kube_control_plane, namespace=ns)
    report = build_report(phase=builder_pb2.BUILD_PHASE_FAILED, now=NOW)
    async with KubernetesJobReporter(
        _config(sa_dir, kube_control_plane.port), job_name="no-such-job"
    ) as reporter:
        with pytest.raises(JobNotFoundError):
            await reporter.publish(report)


async def test_token_is_reread_and_a_foreign_identity_is_forbidden(
    tmp_path: Path,
    lucity_cluster: LucityCluster,
    kube_identities: Identities,
    kube_control_plane: ControlPlane,
    running_build: client.V1Pod,
) -> None:
    """The reporter reads the token file per request (kubelet rotates it)."""
    ns = lucity_cluster.builds_namespace
    good = await kube_identities.token(
        ns, lucity_cluster.build_job_service_account, pod=running_build
    )
    sa_dir = _sa_dir(tmp_path / "sa", token=good, plane=kube_control_plane, namespace=ns)
    report = build_report(phase=builder_pb2.BUILD_PHASE_BUILDING, now=NOW)
    async with KubernetesJobReporter(
        _config(sa_dir, kube_control_plane.port), job_name=_job_of(running_build)
    ) as reporter:
        await reporter.publish(report)
        # The builder's identity may create Jobs but not patch them.
        foreign = await kube_identities.token(
            lucity_cluster.system_namespace, lucity_cluster.builder_service_account
        )
        (sa_dir / "token").write_text(foreign)
        with pytest.raises(AnnotateForbiddenError):
            await reporter.publish(report)


async def test_unreachable_apiserver_is_unavailable(
    tmp_path: Path, lucity_cluster: LucityCluster, kube_control_plane: ControlPlane
) -> None:
    ns = lucity_cluster.builds_namespace
    sa_dir = _sa_dir(tmp_path / "sa", token="x", plane=kube_control_plane, namespace=ns)
    report = build_report(phase=builder_pb2.BUILD_PHASE_BUILDING, now=NOW)
    async with KubernetesJobReporter(_config(sa_dir, free_port()), job_name="any") as reporter:
        with pytest.raises(ApiUnavailableError) as caught:
            await reporter.publish(report)
    assert caught.value.retryable
