"""The test bed's PKI: chains, names and key usages the control plane relies on."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.testbed.pki import ADMIN_GROUP, ADMIN_USER, CONTROLLER_MANAGER_USER, Pki, create_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return create_pki(tmp_path_factory.mktemp("pki"))


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_every_certificate_is_issued_by_the_ca(pki: Pki) -> None:
    ca = _load(pki.ca.cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for pair in (pki.apiserver, pki.admin, pki.controller_manager):
        cert = _load(pair.cert)
        cert.verify_directly_issued_by(ca)
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_serving_certificate_names_loopback_and_the_service(pki: Pki) -> None:
    cert = _load(pki.apiserver.cert)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)
    assert ipaddress.ip_address("10.96.0.1") in sans.get_values_for_type(x509.IPAddress)
    assert "kubernetes.default.svc" in sans.get_values_for_type(x509.DNSName)
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]


@pytest.mark.parametrize(
    ("which", "user", "groups"),
    [
        ("admin", ADMIN_USER, [ADMIN_GROUP]),
        ("controller_manager", CONTROLLER_MANAGER_USER, []),
    ],
)
def test_client_certificates_carry_user_and_groups(
    pki: Pki, which: str, user: str, groups: list[str]
) -> None:
    """The apiserver reads the user from CN and the groups from O."""
    cert = _load(getattr(pki, which).cert)
    subject = cert.subject
    assert [a.value for a in subject.get_attributes_for_oid(NameOID.COMMON_NAME)] == [user]
    assert [a.value for a in subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)] == groups
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_private_keys_are_owner_only(pki: Pki) -> None:
    for path in (pki.ca.key, pki.apiserver.key, pki.admin.key, pki.service_account_key):
        assert path.stat().st_mode & 0o077 == 0, path
