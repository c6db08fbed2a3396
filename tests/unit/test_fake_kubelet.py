"""The fake kubelet's pure rules: $(VAR) expansion, Downward API fields, path mapping."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubernetes_asyncio import client

from tests.testbed.node import PodSetupError, expand, field_value, remap_path

POD = client.V1Pod(
    metadata=client.V1ObjectMeta(
        name="build-x-abcde",
        namespace="lucity-builds",
        uid="u-1",
        labels={"batch.kubernetes.io/job-name": "build-x"},
        annotations={"a/b": "c"},
    ),
    spec=client.V1PodSpec(containers=[], service_account_name="lucity-build-job"),
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$(JOB)", "build-x"),
        ("pre-$(JOB)-post", "pre-build-x-post"),
        ("$(MISSING)", "$(MISSING)"),
        ("$$(JOB)", "$(JOB)"),
        ("$$", "$"),
        ("plain $JOB", "plain $JOB"),
    ],
)
def test_expand(text: str, expected: str) -> None:
    assert expand(text, {"JOB": "build-x"}) == expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("metadata.name", "build-x-abcde"),
        ("metadata.namespace", "lucity-builds"),
        ("metadata.uid", "u-1"),
        ("spec.serviceAccountName", "lucity-build-job"),
        ("metadata.labels['batch.kubernetes.io/job-name']", "build-x"),
        ("metadata.annotations['a/b']", "c"),
        ("metadata.labels['absent']", ""),
    ],
)
def test_field_value(path: str, expected: str) -> None:
    assert field_value(POD, path) == expected


def test_unsupported_field_is_an_error() -> None:
    with pytest.raises(PodSetupError):
        field_value(POD, "status.phase")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("/docker", "/pod/docker-vol"),
        ("/docker/config.json", "/pod/docker-vol/config.json"),
        ("/dockerfile", "/dockerfile"),
        ("/var/run/secrets/kubernetes.io/serviceaccount/token", "/pod/sa/token"),
        ("/var/run/secrets/other", "/pod/secrets/other"),
        ("relative/docker", "relative/docker"),
    ],
)
def test_remap_path_prefers_the_longest_mount(value: str, expected: str) -> None:
    mounts = {
        "/docker": Path("/pod/docker-vol"),
        "/var/run/secrets": Path("/pod/secrets"),
        "/var/run/secrets/kubernetes.io/serviceaccount": Path("/pod/sa"),
    }
    assert remap_path(value, mounts) == expected
