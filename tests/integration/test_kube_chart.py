"""The Helm chart: lint, offline schema validation, and real Pod Security admission.

helm and the schemas run offline (helm built from the Go module proxy; schemas from
the kubernetes-validate package); admission is the real apiserver's PodSecurity
plugin acting on the namespace labels the chart sets.
"""

from __future__ import annotations

import copy
import uuid
from collections import Counter
from typing import Any

import kubernetes_validate
import pytest
from kubernetes_asyncio import client

from tests.integration.kube_jobs import build_job, status_of
from tests.testbed.kube import CHART_DIR, helm, render_chart
from tests.testbed.kube_fixtures import LucityCluster
from tests.testbed.process import pinned_versions

K8S_VERSION = pinned_versions()["K8S_VERSION"]


def test_chart_lints_clean() -> None:
    result = helm("lint", "--strict", "--kube-version", K8S_VERSION, str(CHART_DIR))
    assert "0 chart(s) failed" in result.stdout


def test_rendered_objects_match_schemas_strictly() -> None:
    objects = render_chart()
    # Minor version of the pinned release, e.g. v1.36.3 -> 1.36.0 (schemas are per minor).
    schema_version = ".".join(K8S_VERSION.lstrip("v").split(".")[:2]) + ".0"
    for obj in objects:
        kubernetes_validate.validate(obj, schema_version, strict=True)
    kinds = Counter(obj["kind"] for obj in objects)
    # Cluster-wide only the namespaces and the admission policy: no ClusterRole(Binding)s.
    assert kinds == {
        "Namespace": 2,
        "ServiceAccount": 2,
        "Role": 2,
        "RoleBinding": 2,
        "ValidatingAdmissionPolicy": 1,
        "ValidatingAdmissionPolicyBinding": 1,
    }


def test_validation_rejects_a_broken_object() -> None:
    """The schema check is not vacuous: an unknown field fails strict validation."""
    role = next(o for o in render_chart() if o["kind"] == "Role")
    broken = copy.deepcopy(role)
    broken["rules"][0]["verb"] = ["get"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.36.0", strict=True)


def test_values_switch_off_namespaces_builder_secrets_and_policy() -> None:
    objects = render_chart(
        set_values=[
            "namespaces.create=false",
            "rbac.builderManagesBuildSecrets=false",
            "admission.buildJobOwnReportOnly=false",
        ]
    )
    assert {o["kind"] for o in objects} == {"ServiceAccount", "Role", "RoleBinding"}
    builder_role = next(
        o for o in objects if o["kind"] == "Role" and o["metadata"]["name"] == "lucity-builder"
    )
    assert all("secrets" not in rule["resources"] for rule in builder_role["rules"])


async def test_namespaces_enforce_restricted_pod_security(
    lucity_cluster: LucityCluster, kube_admin: client.ApiClient
) -> None:
    core = client.CoreV1Api(kube_admin)
    for name in (lucity_cluster.system_namespace, lucity_cluster.builds_namespace):
        namespace = await core.read_namespace(name)
        assert namespace.metadata.labels["pod-security.kubernetes.io/enforce"] == "restricted"


def _pod(spec: dict[str, Any]) -> Any:
    # A dict body (the client serialises it as is); Any because the stubs want V1Pod.
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"pss-{uuid.uuid4().hex[:6]}"},
        "spec": spec,
    }


async def test_pod_security_admits_the_build_pod_and_rejects_root(
    lucity_cluster: LucityCluster, kube_admin: client.ApiClient
) -> None:
    """Real admission: even the admin cannot run a root pod in the builds namespace."""
    ns = lucity_cluster.builds_namespace
    core = client.CoreV1Api(kube_admin)
    job = build_job(
        "pss",
        namespace=ns,
        service_account=lucity_cluster.build_job_service_account,
        command=["true"],
    )
    compliant = job["spec"]["template"]["spec"]
    assert await status_of(core.create_namespaced_pod(ns, _pod(compliant), dry_run="All")) == 200

    root = copy.deepcopy(compliant)
    # Root, and allowed to escalate: both break `restricted`, neither is invalid as such.
    root["securityContext"] = {"runAsUser": 0, "seccompProfile": {"type": "RuntimeDefault"}}
    root["containers"][0]["securityContext"] = {"allowPrivilegeEscalation": True}
    with pytest.raises(client.ApiException) as denied:
        await core.create_namespaced_pod(ns, _pod(root), dry_run="All")
    assert denied.value.status == 403
    assert "violates PodSecurity" in str(denied.value.body)
