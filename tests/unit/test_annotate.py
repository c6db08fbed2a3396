"""build_runner.annotate without a cluster: the patch body, settings, CLI and retries."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
from google.protobuf import json_format
from kubernetes_asyncio.client import ApiException

from build_runner import annotate
from build_runner.annotate import (
    REPORT_ANNOTATION,
    SERVICEACCOUNT_DIR_ENV,
    AnnotateError,
    AnnotateForbiddenError,
    ApiUnavailableError,
    InClusterConfig,
    InClusterConfigError,
    JobNotFoundError,
    build_report,
    publish_with_retries,
    report_patch,
)
from builder_service._pb.lucity.builder.v1 import builder_pb2, result_pb2

NOW = datetime.datetime(2026, 11, 28, 12, 30, 5, tzinfo=datetime.UTC)


def test_patch_sets_only_the_report_annotation_and_round_trips() -> None:
    report = build_report(
        phase=builder_pb2.BUILD_PHASE_SUCCEEDED,
        now=NOW,
        image_ref="registry.test/a/b:1",
        digest="sha256:" + "0" * 64,
    )
    patch = report_patch(report)
    assert list(patch) == ["metadata"]
    assert list(patch["metadata"]) == ["annotations"]
    assert list(patch["metadata"]["annotations"]) == [REPORT_ANNOTATION]
    text = patch["metadata"]["annotations"][REPORT_ANNOTATION]
    # proto3 JSON: camelCase names, enum names, RFC 3339 timestamps.
    assert json.loads(text)["phase"] == "BUILD_PHASE_SUCCEEDED"
    assert json.loads(text)["imageRef"] == "registry.test/a/b:1"
    assert json.loads(text)["finishedAt"] == "2026-11-28T12:30:05Z"
    assert json_format.Parse(text, result_pb2.RunnerReport()) == report


@pytest.mark.parametrize(
    ("phase", "finished"),
    [
        (builder_pb2.BUILD_PHASE_CLONING, False),
        (builder_pb2.BUILD_PHASE_BUILDING, False),
        (builder_pb2.BUILD_PHASE_SUCCEEDED, True),
        (builder_pb2.BUILD_PHASE_FAILED, True),
    ],
)
def test_finished_at_only_for_terminal_phases(
    phase: builder_pb2.BuildPhase, finished: bool
) -> None:
    report = build_report(phase=phase, now=NOW)
    assert report.HasField("updated_at")
    assert report.HasField("finished_at") is finished


def _sa_dir(tmp_path: Path, *, files: tuple[str, ...] = ("token", "ca.crt", "namespace")) -> Path:
    for name in files:
        (tmp_path / name).write_text({"namespace": "lucity-builds\n"}.get(name, name))
    return tmp_path


def test_in_cluster_config_reads_env_and_overridden_dir(tmp_path: Path) -> None:
    sa_dir = _sa_dir(tmp_path)
    config = InClusterConfig.from_env(
        {
            "KUBERNETES_SERVICE_HOST": "10.96.0.1",
            "KUBERNETES_SERVICE_PORT": "443",
            SERVICEACCOUNT_DIR_ENV: str(sa_dir),
        }
    )
    assert config.url == "https://10.96.0.1:443"
    assert config.namespace == "lucity-builds"
    assert config.token_file == sa_dir / "token"


def test_ipv6_service_host_is_bracketed(tmp_path: Path) -> None:
    config = InClusterConfig.from_env(
        {
            "KUBERNETES_SERVICE_HOST": "fd00::1",
            "KUBERNETES_SERVICE_PORT": "443",
            SERVICEACCOUNT_DIR_ENV: str(_sa_dir(tmp_path)),
        }
    )
    assert config.url == "https://[fd00::1]:443"


@pytest.mark.parametrize(
    ("env", "files", "message"),
    [
        ({}, ("token", "ca.crt", "namespace"), "KUBERNETES_SERVICE_HOST"),
        ({"KUBERNETES_SERVICE_PORT": "https"}, ("token", "ca.crt", "namespace"), "not a port"),
        ({}, ("ca.crt", "namespace"), "token"),
        ({}, ("token", "namespace"), "ca.crt"),
        ({}, ("token", "ca.crt"), "namespace"),
    ],
)
def test_in_cluster_config_errors(
    tmp_path: Path, env: dict[str, str], files: tuple[str, ...], message: str
) -> None:
    base = {
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": "6443",
        SERVICEACCOUNT_DIR_ENV: str(_sa_dir(tmp_path, files=files)),
    }
    if "KUBERNETES_SERVICE_HOST" in message:
        del base["KUBERNETES_SERVICE_HOST"]
    base.update(env)
    with pytest.raises(InClusterConfigError, match=message):
        InClusterConfig.from_env(base)


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (404, JobNotFoundError),
        (401, AnnotateForbiddenError),
        (403, AnnotateForbiddenError),
        (429, ApiUnavailableError),
        (503, ApiUnavailableError),
        (422, AnnotateError),
    ],
)
def test_api_errors_are_translated(status: int, error: type[AnnotateError]) -> None:
    translated = annotate._translate(ApiException(status=status), job="j")
    assert type(translated) is error
    assert translated.retryable is (error is ApiUnavailableError)


class FakeJobReporter:
    """Fails with the given errors in turn, then succeeds; records each attempt."""

    def __init__(self, *errors: AnnotateError) -> None:
        self.errors = list(errors)
        self.published: list[result_pb2.RunnerReport] = []

    async def publish(self, report: result_pb2.RunnerReport) -> None:
        self.published.append(report)
        if self.errors:
            raise self.errors.pop(0)


async def test_retries_only_retryable_errors() -> None:
    report = build_report(phase=builder_pb2.BUILD_PHASE_BUILDING, now=NOW)
    flaky = FakeJobReporter(ApiUnavailableError("503"), ApiUnavailableError("503"))
    await publish_with_retries(flaky, report, first_delay_s=0)
    assert len(flaky.published) == 3

    forbidden = FakeJobReporter(AnnotateForbiddenError("403"))
    with pytest.raises(AnnotateForbiddenError):
        await publish_with_retries(forbidden, report, first_delay_s=0)
    assert len(forbidden.published) == 1

    down = FakeJobReporter(*[ApiUnavailableError("down")] * 5)
    with pytest.raises(ApiUnavailableError):
        await publish_with_retries(down, report, attempts=3, first_delay_s=0)
    assert len(down.published) == 3


@pytest.mark.parametrize("text", ["SUCCEEDED", "succeeded", "BUILD_PHASE_SUCCEEDED"])
def test_cli_phase_spellings(text: str) -> None:
    args = annotate._parser().parse_args(["--phase", text])
    assert args.phase == builder_pb2.BUILD_PHASE_SUCCEEDED


def test_cli_rejects_unknown_phase(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        annotate._parser().parse_args(["--phase", "DONE"])
    assert exited.value.code == 2
    assert "unknown value 'DONE'" in capsys.readouterr().err


def test_cli_without_job_name_fails_cleanly(capsys: pytest.CaptureFixture[str]) -> None:
    assert annotate.main(["--phase", "FAILED"], environ={}) == 1
    assert "JOB_NAME" in capsys.readouterr().err


def test_cli_outside_a_pod_fails_cleanly(capsys: pytest.CaptureFixture[str]) -> None:
    assert annotate.main(["--phase", "FAILED", "--job-name", "j"], environ={}) == 1
    assert "InClusterConfigError" in capsys.readouterr().err
