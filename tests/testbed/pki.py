"""A throw-away PKI for one test session's Kubernetes control plane.

Owns: one CA, the kube-apiserver serving certificate, client certificates for the
admin and the controller manager, and the ServiceAccount token signing keypair,
all written as PEM files into a directory the fixture deletes afterwards. Keys are
made fresh per run and are never meant to leave the machine.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# A day covers any test session; short lifetimes keep leaked keys worthless.
VALIDITY = datetime.timedelta(days=1)
# Backdated so a clock a little behind (or a second's race at start-up) can't
# make a fresh certificate "not yet valid".
BACKDATE = datetime.timedelta(minutes=5)

ADMIN_USER = "lucity-test-admin"
# system:masters is bound to cluster-admin by the bootstrap RBAC policy.
ADMIN_GROUP = "system:masters"
# The bootstrap ClusterRoleBinding system:kube-controller-manager names this user.
CONTROLLER_MANAGER_USER = "system:kube-controller-manager"


@dataclass(frozen=True)
class CertPair:
    """A certificate and its private key, as PEM file paths."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    """The PEM files the control plane and its clients use."""

    directory: Path
    ca: CertPair
    apiserver: CertPair
    admin: CertPair
    controller_manager: CertPair
    service_account_key: Path
    service_account_pub: Path


def _new_key() -> ec.EllipticCurvePrivateKey:
    # P-256 is accepted everywhere Kubernetes reads keys and is much faster to
    # generate than RSA-2048, which matters at every session start on 2 cores.
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attrs = []
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + VALIDITY)
    )


def _leaf(
    *,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    subject: x509.Name,
    usage: x509.ObjectIdentifier,
    sans: list[x509.GeneralName] | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    builder = (
        _builder(subject, ca_cert.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _save(
    directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> CertPair:
    pair = CertPair(cert=directory / f"{stem}.crt", key=directory / f"{stem}.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(pair.key, key)
    return pair


@dataclass(frozen=True)
class CertificateAuthority:
    """A throw-away CA that issues leaf certificates as PEM files.

    The control plane's PKI below is built with it, and so is any test that needs
    TLS of its own (e.g. a buildkitd requiring client certificates).
    """

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    files: CertPair

    @classmethod
    def create(cls, directory: Path, stem: str, common_name: str) -> CertificateAuthority:
        """Make a self-signed CA and write it as `<stem>.crt` / `<stem>.key`."""
        directory.mkdir(parents=True, exist_ok=True)
        key = _new_key()
        name = _name(common_name)
        cert = (
            _builder(name, name, key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return cls(cert=cert, key=key, files=_save(directory, stem, cert, key))

    def issue(
        self,
        directory: Path,
        stem: str,
        *,
        common_name: str,
        usage: x509.ObjectIdentifier,
        organization: str | None = None,
        sans: list[x509.GeneralName] | None = None,
    ) -> CertPair:
        """Issue a leaf certificate for one usage (server or client auth) and write it."""
        cert, key = _leaf(
            ca_cert=self.cert,
            ca_key=self.key,
            subject=_name(common_name, organization),
            usage=usage,
            sans=sans,
        )
        return _save(directory, stem, cert, key)


def create_pki(directory: Path, *, service_ip: str = "10.96.0.1") -> Pki:
    """Write a fresh CA and every certificate the control plane needs into directory.

    service_ip is the first address of the apiserver's service range: in-cluster
    clients reach the `kubernetes` Service there, so the serving cert names it.
    """
    ca = CertificateAuthority.create(directory, "ca", "lucity-test-ca")

    serving_sans: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address(service_ip)),
        x509.DNSName("localhost"),
        x509.DNSName("kubernetes"),
        x509.DNSName("kubernetes.default"),
        x509.DNSName("kubernetes.default.svc"),
        x509.DNSName("kubernetes.default.svc.cluster.local"),
    ]
    apiserver = ca.issue(
        directory,
        "apiserver",
        common_name="kube-apiserver",
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        sans=serving_sans,
    )
    admin = ca.issue(
        directory,
        "admin",
        common_name=ADMIN_USER,
        organization=ADMIN_GROUP,
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
    )
    controller_manager = ca.issue(
        directory,
        "kube-controller-manager",
        common_name=CONTROLLER_MANAGER_USER,
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
    )

    # Token signing keys are bare keys, not certificates: the apiserver signs
    # with the private half and verifies with the public half.
    sa_key = _new_key()
    sa_key_path = directory / "sa.key"
    _write_key(sa_key_path, sa_key)
    sa_pub_path = directory / "sa.pub"
    sa_pub_path.write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return Pki(
        directory=directory,
        ca=ca.files,
        apiserver=apiserver,
        admin=admin,
        controller_manager=controller_manager,
        service_account_key=sa_key_path,
        service_account_pub=sa_pub_path,
    )
