"""The build Job hand-off end to end on the real control plane.

The builder's ServiceAccount creates the Job; the fake kubelet runs its pod as a
local process; the runner's annotate CLI inside it patches its own Job as
`lucity-build-job` with a pod-bound token; the real Job controller completes the
Job and the real TTL controller deletes it (and the garbage collector its pod).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from google.protobuf import json_format
from kubernetes_asyncio import client

from build_runner.annotate import REPORT_ANNOTATION
from builder_service._pb.lucity.builder.v1 import builder_pb2, result_pb2
from tests.integration.kube_jobs import (
    JOB_NAME_LABEL,
    build_job,
    eventually,
    job_condition,
    status_of,
)
from tests.testbed.kube import ControlPlane
from tests.testbed.kube_fixtures import Identities, LucityCluster
from tests.testbed.node import FakeKubelet

DIGEST = "sha256:" + "ab" * 32


def _audit_events(plane: ControlPlane) -> list[dict[str, Any]]:
    path = plane.workdir / "logs" / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def _job_or_none(batch: client.BatchV1Api, name: str, namespace: str) -> client.V1Job | None:
    try:
        job: client.V1Job = await batch.read_namespaced_job(name, namespace)
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return job


async def test_job_created_by_builder_reports_completes_and_is_deleted(
    lucity_cluster: LucityCluster,
    kube_identities: Identities,
    fake_kubelet: FakeKubelet,
    kube_admin: client.ApiClient,
    kube_control_plane: ControlPlane,
) -> None:
    ns = lucity_cluster.builds_namespace
    name = f"build-{uuid.uuid4().hex[:8]}"
    image_ref = f"registry.test/team/app:{name}"
    builder = await kube_identities.client_for(
        lucity_cluster.system_namespace, lucity_cluster.builder_service_account
    )
    builder_batch = client.BatchV1Api(builder)
    job = build_job(
        name,
        namespace=ns,
        service_account=lucity_cluster.build_job_service_account,
        command=[
            "python",
            "-m",
            "build_runner.annotate",
            "--phase",
            "SUCCEEDED",
            "--image-ref",
            image_ref,
            "--digest",
            DIGEST,
        ],
    )
    created = await builder_batch.create_namespaced_job(ns, job)
    assert created.metadata.uid

    run = await fake_kubelet.wait_for_run(job_name=name, timeout_s=60)
    assert run.exit_code == 0, run.log()

    async def completed() -> client.V1Job | None:
        current = await builder_batch.read_namespaced_job(name, ns)
        return current if job_condition(current, "Complete") else None

    done = await eventually(completed, what=f"Job {name} Complete", timeout_s=60)
    report = json_format.Parse(
        done.metadata.annotations[REPORT_ANNOTATION], result_pb2.RunnerReport()
    )
    assert report.phase == builder_pb2.BUILD_PHASE_SUCCEEDED
    assert report.image_ref == image_ref
    assert report.digest == DIGEST
    assert report.HasField("finished_at")

    # The audit log says who wrote the annotation: the build-job SA, with a token
    # bound to this Job's pod (the pod name travels in the token's extra claims).
    patches = [
        e
        for e in _audit_events(kube_control_plane)
        if e.get("verb") == "patch"
        and e.get("objectRef", {}).get("resource") == "jobs"
        and e.get("objectRef", {}).get("name") == name
        and e.get("stage") == "ResponseComplete"
    ]
    assert len(patches) == 1, patches
    user = patches[0]["user"]
    assert user["username"] == (
        f"system:serviceaccount:{ns}:{lucity_cluster.build_job_service_account}"
    )
    assert user["extra"]["authentication.kubernetes.io/pod-name"] == [run.name]
    assert patches[0]["responseStatus"]["code"] == 200

    # ttlSecondsAfterFinished=3: the TTL controller deletes the Job, the garbage
    # collector its pod.
    async def job_gone() -> bool | None:
        return True if await _job_or_none(builder_batch, name, ns) is None else None

    await eventually(job_gone, what=f"TTL deletion of Job {name}", timeout_s=60)
    core = client.CoreV1Api(kube_admin)

    async def pods_gone() -> bool | None:
        pods = await core.list_namespaced_pod(ns, label_selector=f"{JOB_NAME_LABEL}={name}")
        return True if not pods.items else None

    await eventually(pods_gone, what=f"garbage collection of {name}'s pod", timeout_s=60)
    assert "report written" in run.log()

    # The token the pod was given is bound to the pod: with the pod gone, the API
    # server stops accepting it (401), unlike a long-lived Secret-based token. Not at
    # once: kube-apiserver caches a successful token review for 10 s by default.
    (token_file,) = run.log_path.parent.glob("volumes/kube-api-access-*/token")
    pod_token = client.ApiClient(kube_control_plane.token_configuration(token_file.read_text()))
    async with pod_token:

        async def rejected() -> bool | None:
            status = await status_of(client.BatchV1Api(pod_token).list_namespaced_job(ns))
            return True if status == 401 else None

        await eventually(rejected, what="the dead pod's token to be rejected", timeout_s=30)


async def test_failing_runner_fails_the_job(
    lucity_cluster: LucityCluster,
    kube_identities: Identities,
    fake_kubelet: FakeKubelet,
) -> None:
    ns = lucity_cluster.builds_namespace
    name = f"build-{uuid.uuid4().hex[:8]}"
    builder = await kube_identities.client_for(
        lucity_cluster.system_namespace, lucity_cluster.builder_service_account
    )
    builder_batch = client.BatchV1Api(builder)
    # The runner reports FAILED, then exits non-zero as the real runner will.
    script = (
        "python -m build_runner.annotate --phase FAILED --failure-reason BUILD_FAILED "
        "--error-message 'step 3 failed' && echo 'build failed' && exit 3"
    )
    job = build_job(
        name,
        namespace=ns,
        service_account=lucity_cluster.build_job_service_account,
        command=["sh", "-c", script],
        ttl_s=30,
    )
    await builder_batch.create_namespaced_job(ns, job)

    run = await fake_kubelet.wait_for_run(job_name=name, timeout_s=60)
    assert run.exit_code == 3, run.log()
    assert "build failed" in run.log()

    async def failed() -> client.V1Job | None:
        current = await builder_batch.read_namespaced_job(name, ns)
        return current if job_condition(current, "Failed") else None

    done = await eventually(failed, what=f"Job {name} Failed", timeout_s=60)
    report = json_format.Parse(
        done.metadata.annotations[REPORT_ANNOTATION], result_pb2.RunnerReport()
    )
    assert report.phase == builder_pb2.BUILD_PHASE_FAILED
    assert report.failure_reason == builder_pb2.FAILURE_REASON_BUILD_FAILED
    assert report.error_message == "step 3 failed"
    await builder_batch.delete_namespaced_job(name, ns, propagation_policy="Background")
