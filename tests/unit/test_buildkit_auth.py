"""Docker config parsing and host lookup of the session's credential store."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from build_runner.buildkit.auth import (
    DOCKER_HUB_KEY,
    Credentials,
    DockerConfigError,
    RegistryCredential,
    normalize_registry_key,
)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def config(auths: dict[str, object]) -> str:
    return json.dumps({"auths": auths})


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"auth": b64("alice:s3cret")}, RegistryCredential("alice", "s3cret")),
        # Split at the first colon only: the password may contain colons.
        ({"auth": b64("bob:pa:ss:word")}, RegistryCredential("bob", "pa:ss:word")),
        ({"auth": b64("carol:pw\x00\x00")}, RegistryCredential("carol", "pw")),
        ({"username": "dave", "password": "pw"}, RegistryCredential("dave", "pw")),
        (
            {"auth": b64("erin:from-auth"), "username": "x", "password": "y"},
            RegistryCredential("erin", "from-auth"),
        ),
        ({"identitytoken": "tok-123", "username": "frank"}, RegistryCredential("", "tok-123")),
        ({}, None),  # what a credsStore leaves behind
    ],
)
def test_entry_forms(entry: dict[str, str], expected: RegistryCredential | None) -> None:
    creds = Credentials.from_json(config({"reg.example.com": entry}))
    assert creds.lookup("reg.example.com") == expected


@pytest.mark.parametrize(
    ("key", "host"),
    [
        ("reg.example.com:5000", "reg.example.com:5000"),
        ("https://reg.example.com:5000", "reg.example.com:5000"),
        ("http://reg.example.com/v2/", "reg.example.com"),
        ("https://reg.example.com/v1/", "reg.example.com"),
        (DOCKER_HUB_KEY, "registry-1.docker.io"),
        (DOCKER_HUB_KEY, "docker.io"),
        (DOCKER_HUB_KEY, "index.docker.io"),
        ("docker.io", "registry-1.docker.io"),
    ],
)
def test_key_normalisation_and_hub_alias(key: str, host: str) -> None:
    creds = Credentials.from_json(config({key: {"auth": b64("u:p")}}))
    assert creds.lookup(host) == RegistryCredential("u", "p")


@pytest.mark.parametrize(
    ("key", "host"),
    [
        ("reg.example.com:5000", "reg.example.com"),
        ("reg.example.com", "reg.example.com:5000"),
        ("https://index.docker.io/v1/", "ghcr.io"),
        ("ghcr.io", "registry-1.docker.io"),
    ],
)
def test_no_match(key: str, host: str) -> None:
    creds = Credentials.from_json(config({key: {"auth": b64("u:p")}}))
    assert creds.lookup(host) is None


def test_exact_key_beats_normalised() -> None:
    creds = Credentials.from_json(
        config(
            {
                "https://reg.example.com/v1/": {"auth": b64("a:normalised")},
                "reg.example.com": {"auth": b64("b:exact")},
            }
        )
    )
    assert creds.lookup("reg.example.com") == RegistryCredential("b", "exact")


def test_normalize() -> None:
    assert normalize_registry_key("https://h:1/v1/") == "h:1"
    assert normalize_registry_key("h") == "h"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[]", "not a JSON object"),
        ('{"auths": []}', "not an object"),
        (config({"r": "x"}), "not an object"),
        (config({"r": {"auth": "%%%"}}), "not valid base64"),
        (config({"r": {"auth": b64("nocolon")}}), "username:password"),
        (config({"r": {"username": 5}}), "not a string"),
    ],
)
def test_malformed(raw: str, message: str) -> None:
    with pytest.raises(DockerConfigError, match=message):
        Credentials.from_json(raw)


def test_errors_never_echo_secrets() -> None:
    raw = '{"auths": {"r": {"password": "hunter2-secret"}} oops'
    with pytest.raises(DockerConfigError) as info:
        Credentials.from_json(raw)
    assert "hunter2" not in str(info.value)
    assert info.value.__cause__ is None  # the JSON error quotes the text


def test_repr_hides_secrets() -> None:
    creds = Credentials.from_json(
        config({"reg": {"auth": b64("user:topsecret")}, "tok": {"identitytoken": "idtoken"}})
    )
    found = creds.lookup("reg")
    assert found is not None
    for text in (repr(creds), str(creds), repr(found), str(found)):
        assert "topsecret" not in text
        assert "idtoken" not in text
        assert b64("user:topsecret") not in text
    assert repr(creds) == "Credentials(hosts=['reg', 'tok'])"


def test_store_is_immutable_and_detached_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(config({"reg": {"auth": b64("u:p")}}))
    creds = Credentials.from_docker_config(path)
    path.write_text(config({"reg": {"auth": b64("u:changed")}}))
    path.unlink()
    assert creds.lookup("reg") == RegistryCredential("u", "p")
    with pytest.raises(AttributeError):
        creds.other = 1  # type: ignore[attr-defined]
    found = creds.lookup("reg")
    assert found is not None
    with pytest.raises(AttributeError):
        found.secret = "x"  # type: ignore[misc]


def test_from_environment(tmp_path: Path) -> None:
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(config({"a": {"auth": b64("u:1")}}))
    (tmp_path / "home" / ".docker").mkdir(parents=True)
    (tmp_path / "home" / ".docker" / "config.json").write_text(config({"b": {"auth": b64("u:2")}}))
    from_dir = Credentials.from_environment(
        {"DOCKER_CONFIG": str(tmp_path / "cfg"), "HOME": str(tmp_path / "home")}
    )
    assert from_dir.hosts == ["a"]
    assert Credentials.from_environment({"HOME": str(tmp_path / "home")}).hosts == ["b"]
    assert len(Credentials.from_environment({"DOCKER_CONFIG": str(tmp_path / "none")})) == 0
    assert len(Credentials.from_environment({})) == 0


def test_unreadable_config(tmp_path: Path) -> None:
    os.mkdir(tmp_path / "config.json")
    with pytest.raises(DockerConfigError, match="cannot read"):
        Credentials.from_docker_config_dir(tmp_path)
