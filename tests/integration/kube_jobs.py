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
