"""Job manifests and waits shared by the Kubernetes integration tests.

Owns: a Pod Security `restricted`-compliant build Job like the builder will create
(the runner image replaced by a command of this project), and polling helpers with
bounded waits. The builder's own manifest code is tested against the cluster in its
own issue; this one only has to be a realistic Job.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from kubernetes_asyncio import client

T = TypeVar("T")

JOB_NAME_LABEL = "batch.kubernetes.io/job-name"


def build_job(
    name: str,
    *,
    namespace: str,
    service_account: str,
    command: Sequence[str],
    ttl_s: int = 3,
    suspend: bool = False,
    extra_env: Sequence[dict[str, Any]] = (),
) -> Any:
    """A one-pod, no-retry Job that runs command as service_account.

    A plain dict: the generated client serialises dicts as bodies at run time,
    though its stubs name only the model classes (hence Any).
    """
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": "lucity-build"}},
        "spec": {
            "backoffLimit": 0,
            "ttlSecondsAfterFinished": ttl_s,
            "activeDeadlineSeconds": 300,
            "suspend": suspend,
            "template": {
                "metadata": {"labels": {"app": "lucity-build"}},
                "spec": {
                    "serviceAccountName": service_account,
                    "restartPolicy": "Never",
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 10001,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [
                        {
                            "name": "runner",
                            "image": "lucity/build-runner:test",
                            "command": list(command),
                            "env": [
                                {
                                    "name": "JOB_NAME",
                                    "valueFrom": {
                                        "fieldRef": {
                                            "fieldPath": f"metadata.labels['{JOB_NAME_LABEL}']"
                                        }
                                    },
                                },
                                *extra_env,
                            ],
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]},
                                "readOnlyRootFilesystem": True,
                            },
                        }
                    ],
                },
            },
        },
    }


async def eventually(
    probe: Callable[[], Awaitable[T | None]], *, what: str, timeout_s: float = 60.0
) -> T:
    """Poll probe until it returns something other than None; fail after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = await probe()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        await asyncio.sleep(0.2)


def job_condition(job: client.V1Job, kind: str) -> bool:
    """True if the Job has condition kind (e.g. Complete, Failed) with status True."""
    return any(c.type == kind and c.status == "True" for c in job.status.conditions or [])


async def status_of(call: Awaitable[Any]) -> int:
    """The HTTP status a client call ended with: 200 on success, else the error's."""
    try:
        await call
    except client.ApiException as exc:
        return int(exc.status)
    return 200


async def start_sleeping_job(
    api: client.ApiClient,
    name: str,
    *,
    namespace: str,
    service_account: str,
    annotations: dict[str, str] | None = None,
    timeout_s: float = 60.0,
) -> client.V1Pod:
    """Create a Job whose pod just sleeps, and return the pod once the fake kubelet runs it.

    Tokens bound to that pod are what a runner holds; delete the Job to end it.
    """
    job = build_job(
        name,
        namespace=namespace,
        service_account=service_account,
        command=["sleep", "300"],
        ttl_s=30,
    )
    if annotations:
        job["metadata"]["annotations"] = dict(annotations)
    await client.BatchV1Api(api).create_namespaced_job(namespace, job)
    core = client.CoreV1Api(api)

    async def running_pod() -> client.V1Pod | None:
        pods = await core.list_namespaced_pod(namespace, label_selector=f"{JOB_NAME_LABEL}={name}")
        return next((p for p in pods.items if p.status.phase == "Running"), None)

    return await eventually(
        running_pod,
        what=f"a running pod of Job {name} (is the fake_kubelet fixture in use?)",
        timeout_s=timeout_s,
    )


async def delete_job(api: client.ApiClient, name: str, *, namespace: str) -> None:
    """Delete a Job and (in the background, by the garbage collector) its pods."""
    await client.BatchV1Api(api).delete_namespaced_job(
        name, namespace, propagation_policy="Background"
    )
