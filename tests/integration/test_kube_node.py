"""The fake kubelet gives pods what a kubelet would: env refs, volumes, a bound token.

Also: deleting a Job (the builder's CancelBuild) stops its running process, because
the garbage collector deletes the pod and the fake kubelet kills what it ran.
"""

from __future__ import annotations

import asyncio
import json
import uuid

from kubernetes_asyncio import client

from tests.integration.kube_jobs import build_job
from tests.testbed.kube_fixtures import Identities, LucityCluster
from tests.testbed.node import FakeKubelet

DOCKER_CONFIG = {"auths": {"registry.test": {"auth": "dXNlcjpwYXNz"}}}


async def test_pod_gets_secret_volume_env_refs_and_service_account_dir(
    lucity_cluster: LucityCluster,
    kube_identities: Identities,
    kube_admin: client.ApiClient,
    fake_kubelet: FakeKubelet,
) -> None:
    ns = lucity_cluster.builds_namespace
    suffix = uuid.uuid4().hex[:8]
    core = client.CoreV1Api(kube_admin)
    await core.create_namespaced_secret(
        ns,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name=f"push-{suffix}"),
            string_data={"config.json": json.dumps(DOCKER_CONFIG)},
        ),
    )
    await core.create_namespaced_secret(
        ns,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name=f"git-{suffix}"), string_data={"token": "s3cr3t"}
        ),
    )
    await core.create_namespaced_config_map(
        ns,
        client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name=f"cfg-{suffix}"), data={"mode": "fast"}
        ),
    )
    name = f"node-{suffix}"
    script = (
        'echo "config=$(cat "$DOCKER_CONFIG/config.json")"; '
        'echo "token=$GIT_TOKEN mode=$MODE ns=$POD_NAMESPACE job=$JOB_NAME"; '
        'echo "sa-ns=$(cat "$LUCITY_SERVICEACCOUNT_DIR/namespace")"; '
        'test -s "$LUCITY_SERVICEACCOUNT_DIR/token" && echo token-file-ok; '
        "grep -q 'BEGIN CERTIFICATE' \"$LUCITY_SERVICEACCOUNT_DIR/ca.crt\" && echo ca-ok"
    )
    job = build_job(
        name,
        namespace=ns,
        service_account=lucity_cluster.build_job_service_account,
        command=["sh", "-c", script],
        extra_env=[
            {"name": "DOCKER_CONFIG", "value": "/docker"},
            {
                "name": "GIT_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": f"git-{suffix}", "key": "token"}},
            },
            {
                "name": "MODE",
                "valueFrom": {"configMapKeyRef": {"name": f"cfg-{suffix}", "key": "mode"}},
            },
            {
                "name": "POD_NAMESPACE",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
            },
        ],
    )
    pod_spec = job["spec"]["template"]["spec"]
    pod_spec["volumes"] = [{"name": "docker", "secret": {"secretName": f"push-{suffix}"}}]
    pod_spec["containers"][0]["volumeMounts"] = [
        {"name": "docker", "mountPath": "/docker", "readOnly": True}
    ]
    builder = await kube_identities.client_for(
        lucity_cluster.system_namespace, lucity_cluster.builder_service_account
    )
    await client.BatchV1Api(builder).create_namespaced_job(ns, job)

    run = await fake_kubelet.wait_for_run(job_name=name, timeout_s=60)
    log = run.log()
    assert run.exit_code == 0, log
    assert f"config={json.dumps(DOCKER_CONFIG)}" in log
    assert f"token=s3cr3t mode=fast ns={ns} job={name}" in log
    assert f"sa-ns={ns}" in log
    assert "token-file-ok" in log
    assert "ca-ok" in log


async def test_deleting_a_running_job_kills_its_process(
    lucity_cluster: LucityCluster,
    kube_identities: Identities,
    kube_admin: client.ApiClient,
    fake_kubelet: FakeKubelet,
) -> None:
    ns = lucity_cluster.builds_namespace
    name = f"cancel-{uuid.uuid4().hex[:8]}"
    builder = await kube_identities.client_for(
        lucity_cluster.system_namespace, lucity_cluster.builder_service_account
    )
    batch = client.BatchV1Api(builder)
    job = build_job(
        name,
        namespace=ns,
        service_account=lucity_cluster.build_job_service_account,
        command=["sh", "-c", "echo started; exec sleep 300"],
    )
    await batch.create_namespaced_job(ns, job)
    core = client.CoreV1Api(kube_admin)

    async def running() -> str:
        while True:
            pods = await core.list_namespaced_pod(
                ns, label_selector=f"batch.kubernetes.io/job-name={name}"
            )
            for pod in pods.items:
                if pod.status.phase == "Running":
                    return str(pod.metadata.name)
            await asyncio.sleep(0.2)

    pod_name = await asyncio.wait_for(running(), timeout=60)
    # pods/log is allowed for the builder; with no node to proxy to, the apiserver
    # answers 204 No Content (see tests/testbed/KUBERNETES.md, "Pod logs").
    body, status, _ = await client.CoreV1Api(builder).read_namespaced_pod_log_with_http_info(
        pod_name, ns
    )
    assert status == 204
    assert not body
    await batch.delete_namespaced_job(name, ns, propagation_policy="Background")

    run = await fake_kubelet.wait_for_run(job_name=name, timeout_s=60)
    assert run.reason == "pod deleted while running"
    assert run.exit_code == 128 + 15  # SIGTERM, as a container runtime reports it
    assert "started" in run.log()
