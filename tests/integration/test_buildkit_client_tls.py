"""BuildkitClient over TCP with mutual TLS, against a real buildkitd started with TLS flags.

The shared test-bed daemon listens on plain TCP, so this module starts its own
buildkitd (a worker is required to start; no build runs) with a throw-away CA, a
server certificate valid only for the name `buildkitd.test`, and a client
certificate.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from build_runner.buildkit.client import BuildkitClient, ConnectOptions, TLSOptions
from build_runner.buildkit.errors import BuildkitUnavailableError
from tests.testbed.pki import CertificateAuthority, CertPair
from tests.testbed.process import Daemon, binary, free_port, port_open

pytestmark = pytest.mark.buildkit

SERVER_NAME = "buildkitd.test"


@dataclass(frozen=True)
class TlsDaemon:
    address: str
    ca: Path
    client: CertPair
    other_ca: Path


@pytest.fixture(scope="module")
def tls_buildkitd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsDaemon]:
    directory = tmp_path_factory.mktemp("buildkitd-tls")
    ca = CertificateAuthority.create(directory, "ca", "lucity test CA")
    other_ca = CertificateAuthority.create(directory, "other-ca", "unrelated CA")
    # The certificate names only SERVER_NAME, not 127.0.0.1: connecting by IP needs
    # the server-name override to verify.
    server = ca.issue(
        directory,
        "server",
        common_name=SERVER_NAME,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        sans=[x509.DNSName(SERVER_NAME)],
    )
    client = ca.issue(
        directory,
        "client",
        common_name="lucity-build-runner",
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
    )
    port = free_port()
    daemon = Daemon(
        name="buildkitd-tls",
        argv=[
            str(binary("buildkit", "buildkitd")),
            "--root",
            str(directory / "root"),
            "--addr",
            f"tcp://127.0.0.1:{port}",
            "--tlscacert",
            str(ca.files.cert),
            "--tlscert",
            str(server.cert),
            "--tlskey",
            str(server.key),
            "--oci-worker=true",
            "--oci-worker-binary=/usr/sbin/runc",
            "--containerd-worker=false",
        ],
        log_path=directory / "buildkitd.log",
    ).start()
    try:
        daemon.wait_ready(lambda: port_open(port), timeout_s=30)
        yield TlsDaemon(
            address=f"tcp://127.0.0.1:{port}",
            ca=ca.files.cert,
            client=client,
            other_ca=other_ca.files.cert,
        )
    finally:
        daemon.stop()


async def test_mutual_tls_with_server_name_override(tls_buildkitd: TlsDaemon) -> None:
    tls = TLSOptions(
        ca_path=tls_buildkitd.ca,
        cert_path=tls_buildkitd.client.cert,
        key_path=tls_buildkitd.client.key,
        server_name=SERVER_NAME,
    )
    async with BuildkitClient(ConnectOptions(address=tls_buildkitd.address, tls=tls)) as c:
        assert (await c.info()).version == "v0.32.2"
        assert (await c.default_platform()).os == "linux"


@pytest.mark.parametrize("case", ["no client certificate", "unknown CA", "no name override"])
async def test_tls_failures_are_unavailable(tls_buildkitd: TlsDaemon, case: str) -> None:
    d = tls_buildkitd
    tls = {
        "no client certificate": TLSOptions(ca_path=d.ca, server_name=SERVER_NAME),
        "unknown CA": TLSOptions(
            ca_path=d.other_ca,
            cert_path=d.client.cert,
            key_path=d.client.key,
            server_name=SERVER_NAME,
        ),
        "no name override": TLSOptions(
            ca_path=d.ca, cert_path=d.client.cert, key_path=d.client.key
        ),
    }[case]
    started = time.monotonic()
    with pytest.raises(BuildkitUnavailableError, match="not ready after 1s"):
        async with BuildkitClient(ConnectOptions(address=d.address, tls=tls, ready_timeout_s=1.0)):
            pass
    assert time.monotonic() - started < 5.0
