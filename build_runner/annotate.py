"""Record the runner's report on its own Job, as the annotation the builder reads.

Owns: the in-cluster connection settings (service env vars plus the mounted
ServiceAccount files), the merge patch of `builds.lucity.dev/report` carrying a
`lucity.builder.v1.RunnerReport` in its JSON form, the translation of Kubernetes
client errors into the small tree below, and a CLI (`python -m build_runner.annotate`).
It patches nothing but that one annotation, and only on the Job named to it.

    AnnotateError
    ├── InClusterConfigError    service env vars or ServiceAccount files missing
    ├── JobNotFoundError        our Job is gone (deleted, or the wrong name)
    ├── AnnotateForbiddenError  the API server refused our identity (401/403)
    └── ApiUnavailableError     the API server is unreachable or overloaded; retryable
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import aiohttp
from google.protobuf import json_format
from kubernetes_asyncio import client

from builder_service._pb.lucity.builder.v1 import builder_pb2, result_pb2

REPORT_ANNOTATION = "builds.lucity.dev/report"
# Where the kubelet mounts the pod's ServiceAccount token, CA and namespace.
DEFAULT_SERVICEACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# Overrides DEFAULT_SERVICEACCOUNT_DIR: the test bed's fake kubelet runs many pods
# as local processes and gives each one its own directory.
SERVICEACCOUNT_DIR_ENV = "LUCITY_SERVICEACCOUNT_DIR"
# Set by the Job spec from the pod label `batch.kubernetes.io/job-name` (Downward API).
JOB_NAME_ENV = "JOB_NAME"
TERMINAL_PHASES = frozenset({builder_pb2.BUILD_PHASE_SUCCEEDED, builder_pb2.BUILD_PHASE_FAILED})


class AnnotateError(Exception):
    """Base of every error this module raises."""

    # Whether trying the same patch again later can succeed.
    retryable = False


class InClusterConfigError(AnnotateError):
    """The pod lacks the service env vars or the ServiceAccount files."""


class JobNotFoundError(AnnotateError):
    """The Job to annotate does not exist (any more)."""


class AnnotateForbiddenError(AnnotateError):
    """The API server rejected our credentials or RBAC denied the patch."""


class ApiUnavailableError(AnnotateError):
    """The API server could not be reached or asked us to come back later."""

    retryable = True


@dataclass(frozen=True)
class InClusterConfig:
    """How a pod reaches the API server: the `kubernetes` Service and its SA files."""

    host: str
    port: int
    token_file: Path
    ca_file: Path
    namespace: str

    @property
    def url(self) -> str:
        """The API server's HTTPS base URL (IPv6 hosts bracketed)."""
        host = self.host
        try:
            if ipaddress.ip_address(host).version == 6:
                host = f"[{host}]"
        except ValueError:
            pass
        return f"https://{host}:{self.port}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> InClusterConfig:
        """Read the standard in-cluster env vars and ServiceAccount directory."""
        host = environ.get("KUBERNETES_SERVICE_HOST", "")
        port_text = environ.get("KUBERNETES_SERVICE_PORT", "")
        if not host or not port_text:
            raise InClusterConfigError(
                "KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT must be set (are we in a pod?)"
            )
        try:
            port = int(port_text)
        except ValueError as exc:
            raise InClusterConfigError(
                f"KUBERNETES_SERVICE_PORT is not a port: {port_text!r}"
            ) from exc
        sa_dir = Path(environ.get(SERVICEACCOUNT_DIR_ENV) or DEFAULT_SERVICEACCOUNT_DIR)
        token_file, ca_file = sa_dir / "token", sa_dir / "ca.crt"
        for path in (token_file, ca_file):
            if not path.is_file():
                raise InClusterConfigError(f"ServiceAccount file {path} is missing")
        try:
            namespace = (sa_dir / "namespace").read_text().strip()
        except OSError as exc:
            raise InClusterConfigError(f"cannot read {sa_dir / 'namespace'}: {exc}") from exc
        return cls(
            host=host, port=port, token_file=token_file, ca_file=ca_file, namespace=namespace
        )


def report_json(report: result_pb2.RunnerReport) -> str:
    """The report's canonical JSON form, as stored in the annotation."""
    return json_format.MessageToJson(report, indent=None, sort_keys=True)


def report_patch(report: result_pb2.RunnerReport) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that sets our annotation and touches nothing else."""
    return {"metadata": {"annotations": {REPORT_ANNOTATION: report_json(report)}}}


def build_report(
    *,
    phase: builder_pb2.BuildPhase,
    now: datetime.datetime,
    resolved_commit: str = "",
    image_ref: str = "",
    digest: str = "",
    error_message: str = "",
    failure_reason: builder_pb2.FailureReason = builder_pb2.FAILURE_REASON_UNSPECIFIED,
) -> result_pb2.RunnerReport:
    """A RunnerReport stamped updated_at=now, and finished_at=now when phase is terminal."""
    report = result_pb2.RunnerReport(
        phase=phase,
        resolved_commit=resolved_commit,
        image_ref=image_ref,
        digest=digest,
        error_message=error_message,
        failure_reason=failure_reason,
    )
    report.updated_at.FromDatetime(now)
    if phase in TERMINAL_PHASES:
        report.finished_at.FromDatetime(now)
    return report


class JobReporter(Protocol):
    """Where the runner publishes its report: in production, its own Job."""

    async def publish(self, report: result_pb2.RunnerReport) -> None:
        """Store report so the builder service can read it."""


def _translate(exc: client.ApiException, *, job: str) -> AnnotateError:
    status = exc.status or 0
    detail = f"patching Job {job}: HTTP {status} {exc.reason}"
    if status == 404:
        return JobNotFoundError(detail)
    if status in (401, 403):
        return AnnotateForbiddenError(detail)
    if status == 429 or status >= 500:
        return ApiUnavailableError(detail)
    return AnnotateError(detail)


class KubernetesJobReporter:
    """Publishes the report as an annotation on one Job, with the pod's own token."""

    def __init__(
        self, config: InClusterConfig, *, job_name: str, request_timeout_s: float = 30.0
    ) -> None:
        self._config = config
        self._job_name = job_name
        self._timeout_s = request_timeout_s
        configuration = client.Configuration(host=config.url, ssl_ca_cert=str(config.ca_file))
        configuration.api_key_prefix = {"BearerToken": "Bearer"}
        # The kubelet rotates projected tokens; read the file before every request
        # rather than once, so a long build never presents an expired token.
        configuration.refresh_api_key_hook = self._load_token
        # The client only consults the hook once a BearerToken is present, so an
        # empty api_key would silently send anonymous requests.
        self._load_token(configuration)
        self._api = client.ApiClient(configuration)

    def _load_token(self, configuration: client.Configuration) -> None:
        try:
            token = self._config.token_file.read_text().strip()
        except OSError as exc:
            raise InClusterConfigError(
                f"cannot read token {self._config.token_file}: {exc}"
            ) from exc
        configuration.api_key = {"BearerToken": token}

    async def __aenter__(self) -> KubernetesJobReporter:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Release the HTTP connection pool."""
        await self._api.close()

    async def publish(self, report: result_pb2.RunnerReport) -> None:
        """Merge-patch our Job's report annotation."""
        jobs = client.BatchV1Api(self._api)
        try:
            await jobs.patch_namespaced_job(
                self._job_name,
                self._config.namespace,
                report_patch(report),
                # The generated client would pick strategic-merge for a dict body;
                # a plain JSON merge patch is all we need and means the same for
                # an annotation map on any server.
                _content_type="application/merge-patch+json",
                _request_timeout=self._timeout_s,
            )  # type: ignore[call-arg]  # the stubs omit the runtime's _content_type
        except client.ApiException as exc:
            raise _translate(exc, job=self._job_name) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ApiUnavailableError(f"patching Job {self._job_name}: {exc!r}") from exc


async def publish_with_retries(
    reporter: JobReporter,
    report: result_pb2.RunnerReport,
    *,
    attempts: int = 4,
    first_delay_s: float = 0.5,
) -> None:
    """Publish, retrying only retryable errors with doubling delays."""
    delay = first_delay_s
    for attempt in range(1, attempts + 1):
        try:
            await reporter.publish(report)
            return
        except AnnotateError as exc:
            if not exc.retryable or attempt == attempts:
                raise
        await asyncio.sleep(delay)
        delay *= 2


def _enum_value(enum: Any, prefix: str, text: str) -> int:
    name = text.upper()
    if not name.startswith(prefix):
        name = prefix + name
    try:
        value: int = enum.Value(name)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"unknown value {text!r}") from exc
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m build_runner.annotate",
        description="Write a RunnerReport on this pod's Job (annotation builds.lucity.dev/report).",
    )
    parser.add_argument(
        "--phase",
        required=True,
        type=lambda t: _enum_value(builder_pb2.BuildPhase, "BUILD_PHASE_", t),
        help="e.g. SUCCEEDED, FAILED, BUILDING",
    )
    parser.add_argument("--resolved-commit", default="")
    parser.add_argument("--image-ref", default="")
    parser.add_argument("--digest", default="")
    parser.add_argument("--error-message", default="")
    parser.add_argument(
        "--failure-reason",
        type=lambda t: _enum_value(builder_pb2.FailureReason, "FAILURE_REASON_", t),
        default=builder_pb2.FAILURE_REASON_UNSPECIFIED,
        help="e.g. BUILD_FAILED",
    )
    parser.add_argument(
        "--job-name", default=None, help=f"defaults to the {JOB_NAME_ENV} environment variable"
    )
    return parser


async def _run(args: argparse.Namespace, environ: Mapping[str, str]) -> None:
    job_name = args.job_name or environ.get(JOB_NAME_ENV, "")
    if not job_name:
        raise InClusterConfigError(f"no --job-name and {JOB_NAME_ENV} is not set")
    config = InClusterConfig.from_env(environ)
    report = build_report(
        phase=args.phase,
        now=datetime.datetime.now(datetime.UTC),
        resolved_commit=args.resolved_commit,
        image_ref=args.image_ref,
        digest=args.digest,
        error_message=args.error_message,
        failure_reason=args.failure_reason,
    )
    async with KubernetesJobReporter(config, job_name=job_name) as reporter:
        await publish_with_retries(reporter, report)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """CLI entry: exit 0 when the annotation is written, 1 when it could not be."""
    args = _parser().parse_args(argv)
    try:
        asyncio.run(_run(args, os.environ if environ is None else environ))
    except AnnotateError as exc:
        print(f"annotate: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"annotate: report written ({builder_pb2.BuildPhase.Name(args.phase)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
