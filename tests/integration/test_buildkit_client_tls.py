"""BuildkitClient over TCP with mutual TLS, against a real buildkitd started with TLS flags.

The shared test-bed daemon listens on plain TCP, so this module starts its own
buildkitd (a worker is required to start; no build runs) with a throw-away CA, a
server certificate valid only for the name `buildkitd.test`, and a client
certificate.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from build_runner.buildkit.client import BuildkitClient, ConnectOptions, TLSOptions
from build_runner.buildkit.errors import BuildkitUnavailableError
from tests.testbed.process import Daemon, binary, free_port, port_open

pytestmark = pytest.mark.buildkit

SERVER_NAME = "buildkitd.test"


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class TlsDaemon:
    address: str
    ca: Path
    client: Pair
    other_ca: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(
    directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> Pair:
    pair = Pair(directory / f"{stem}.pem", directory / f"{stem}-key.pem")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pair.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pair.key.chmod(0o600)
    return pair


def _issue(
    directory: Path,
    stem: str,
    *,
    subject: str,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    usage: x509.ObjectIdentifier | None = None,
    dns: str | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, Pair]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer[0].subject if issuer else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=2))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if dns is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False
        )
    signer = issuer[1] if issuer else key
    cert = builder.sign(signer, hashes.SHA256())
    return cert, key, _write(directory, stem, cert, key)


@pytest.fixture(scope="module")
def tls_buildkitd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsDaemon]:
    directory = tmp_path_factory.mktemp("buildkitd-tls")
    ca_cert, ca_key, ca = _issue(directory, "ca", subject="lucity test CA", issuer=None)
    _, _, other_ca = _issue(directory, "other-ca", subject="unrelated CA", issuer=None)
    # The certificate names only SERVER_NAME, not 127.0.0.1: connecting by IP needs
    # the server-name override to verify.
    _, _, server = _issue(
        directory,
        "server",
        subject=SERVER_NAME,
        issuer=(ca_cert, ca_key),
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        dns=SERVER_NAME,
    )
    _, _, client = _issue(
        directory,
        "client",
        subject="lucity-build-runner",
        issuer=(ca_cert, ca_key),
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
            str(ca.cert),
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
            address=f"tcp://127.0.0.1:{port}", ca=ca.cert, client=client, other_ca=other_ca.cert
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
