"""The generated protobuf modules import, and the API contract has the shape we publish."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
from google.protobuf import json_format

from builder_service._pb.lucity.builder.v1 import builder_pb2, result_pb2


def _generated_modules(package: str) -> list[str]:
    pkg = importlib.import_module(package)
    return sorted(
        m.name
        for m in pkgutil.walk_packages(pkg.__path__, prefix=f"{package}.")
        if m.name.endswith(("_pb2", "_pb2_grpc"))
    )


@pytest.mark.parametrize("package", ["builder_service._pb", "build_runner._pb"])
def test_every_generated_module_imports(package: str) -> None:
    names = _generated_modules(package)
    assert names, f"no generated modules under {package}"
    for name in names:
        importlib.import_module(name)


def test_builder_service_methods() -> None:
    service = builder_pb2.DESCRIPTOR.services_by_name["BuilderService"]
    assert service.full_name == "lucity.builder.v1.BuilderService"
    methods = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert methods == {
        "StartBuild": (False, False),
        "GetBuild": (False, False),
        "WatchBuild": (False, True),
        "StreamBuildLogs": (False, True),
        "CancelBuild": (False, False),
    }


def test_phases_cover_the_build_lifecycle() -> None:
    names = set(builder_pb2.BuildPhase.keys())
    for phase in ("QUEUED", "CLONING", "BUILDING", "PUSHING", "SUCCEEDED", "FAILED", "CANCELLED"):
        assert f"BUILD_PHASE_{phase}" in names


def test_git_token_is_not_a_message_field() -> None:
    # The token travels as gRPC metadata only, so it can never be logged with a request.
    fields = {f.name for f in builder_pb2.StartBuildRequest.DESCRIPTOR.fields}
    assert not {f for f in fields if "token" in f or "password" in f or "secret" in f}
    assert {"source_url", "git_ref", "service", "image_repository", "context_path"} <= fields
    assert {"idempotency_key", "tenant", "project"} <= fields


def test_runner_report_round_trips_through_json() -> None:
    report = result_pb2.RunnerReport(
        phase=builder_pb2.BUILD_PHASE_FAILED,
        error_message='process "/bin/sh -c make" did not complete successfully: exit code: 2',
        failure_reason=builder_pb2.FAILURE_REASON_BUILD_FAILED,
        resolved_commit="0123456789abcdef0123456789abcdef01234567",
    )
    report.finished_at.FromSeconds(1_790_000_000)
    text = json_format.MessageToJson(report)
    parsed = json_format.Parse(text, result_pb2.RunnerReport())
    assert parsed == report
    assert '"phase": "BUILD_PHASE_FAILED"' in text
