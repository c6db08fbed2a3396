"""Connection options and the grpc error chokepoint of the BuildKit client (no daemon)."""

from __future__ import annotations

from pathlib import Path

import grpc
import grpc.aio
import pytest

from build_runner.buildkit.client import (
    MAX_MESSAGE_BYTES,
    ConnectOptions,
    TLSOptions,
    _translated,
    new_ref,
)
from build_runner.buildkit.errors import (
    BuildkitError,
    BuildkitUnavailableError,
    SolveCancelledError,
    SolveError,
)


@pytest.mark.parametrize(
    ("address", "target"),
    [
        ("unix:///run/buildkit/buildkitd.sock", "unix:///run/buildkit/buildkitd.sock"),
        ("unix:/run/b.sock", "unix:///run/b.sock"),
        ("tcp://127.0.0.1:1234", "127.0.0.1:1234"),
        ("tcp://buildkitd.lucity.svc:1234/", "buildkitd.lucity.svc:1234"),
    ],
)
def test_grpc_target(address: str, target: str) -> None:
    assert ConnectOptions(address=address).grpc_target() == target


@pytest.mark.parametrize("address", ["127.0.0.1:1234", "http://x:1", "docker-container://bk"])
def test_unsupported_address(address: str) -> None:
    with pytest.raises(ValueError, match="unsupported buildkitd address"):
        ConnectOptions(address=address).grpc_target()


def test_channel_options_raise_message_limits_and_override_name() -> None:
    opts = dict(
        ConnectOptions(
            address="tcp://10.0.0.1:1234", tls=TLSOptions(server_name="buildkitd")
        ).channel_options()
    )
    assert opts["grpc.max_send_message_length"] == MAX_MESSAGE_BYTES == 16 * 1024 * 1024
    assert opts["grpc.max_receive_message_length"] == MAX_MESSAGE_BYTES
    assert opts["grpc.ssl_target_name_override"] == "buildkitd"
    # grpc-go servers punish pings more frequent than every 5 minutes.
    assert int(opts["grpc.keepalive_time_ms"]) >= 300_000
    assert "grpc.ssl_target_name_override" not in dict(
        ConnectOptions(address="tcp://x:1").channel_options()
    )


def test_mutual_tls_needs_cert_and_key(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    with pytest.raises(ValueError, match="both cert_path and key_path"):
        TLSOptions(cert_path=cert).credentials()


def test_ref_shape() -> None:
    refs = {new_ref() for _ in range(50)}
    assert len(refs) == 50
    assert all(len(r) == 25 and r.isalnum() and r.islower() for r in refs)


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details, debug_error_string=None
    )


@pytest.mark.parametrize(
    ("code", "solving", "expected"),
    [
        (grpc.StatusCode.UNAVAILABLE, False, BuildkitUnavailableError),
        (grpc.StatusCode.UNAVAILABLE, True, BuildkitUnavailableError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, False, BuildkitUnavailableError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, True, SolveError),
        (grpc.StatusCode.CANCELLED, True, SolveCancelledError),
        (grpc.StatusCode.UNKNOWN, True, SolveError),
        (grpc.StatusCode.INVALID_ARGUMENT, False, BuildkitError),
    ],
)
def test_error_chokepoint(code: grpc.StatusCode, solving: bool, expected: type[Exception]) -> None:
    original = _rpc_error(code, "the details")
    with pytest.raises(expected) as caught, _translated("Call", solving=solving):
        raise original
    assert type(caught.value) is expected
    assert isinstance(caught.value, BuildkitError)
    assert caught.value.code == code
    assert "the details" in str(caught.value)
    assert caught.value.__cause__ is original


def test_chokepoint_leaves_other_errors_alone() -> None:
    with pytest.raises(KeyError), _translated("Call"):
        raise KeyError("x")
