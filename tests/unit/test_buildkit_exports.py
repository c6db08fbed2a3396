"""Exporter/cache attribute maps, image config JSON and exporter-response parsing."""

from __future__ import annotations

import base64
import json

import pytest

from build_runner.buildkit.exports import (
    Exporter,
    HistoryEntry,
    ImageConfig,
    ImageExport,
    RegistryCache,
    SolveResult,
)


def test_image_config_json() -> None:
    cfg = ImageConfig(
        os="linux",
        architecture="arm64",
        variant="v8",
        env=["PATH=/usr/bin", "A=1"],
        workdir="/app",
        user="1000:1000",
        cmd=["serve"],
        entrypoint=["/bin/app"],
        labels={"org.opencontainers.image.source": "https://example.com/r"},
        exposed_ports=["8080", "53/udp"],
        history=[
            HistoryEntry(created_by="base", created="2026-01-01T00:00:00Z"),
            HistoryEntry(created_by="ENV A=1", empty_layer=True, comment="c"),
        ],
        created="2026-01-02T00:00:00Z",
    )
    doc = json.loads(cfg.to_json())
    assert doc == {
        "os": "linux",
        "architecture": "arm64",
        "variant": "v8",
        "config": {
            "Env": ["PATH=/usr/bin", "A=1"],
            "WorkingDir": "/app",
            "User": "1000:1000",
            "Cmd": ["serve"],
            "Entrypoint": ["/bin/app"],
            "Labels": {"org.opencontainers.image.source": "https://example.com/r"},
            "ExposedPorts": {"8080/tcp": {}, "53/udp": {}},
        },
        "rootfs": {"type": "layers", "diff_ids": []},
        "history": [
            {"created": "2026-01-01T00:00:00Z", "created_by": "base"},
            {"created_by": "ENV A=1", "comment": "c", "empty_layer": True},
        ],
        "created": "2026-01-02T00:00:00Z",
    }
    # Sorted keys and no whitespace: equal configs are equal bytes.
    assert cfg.to_json() == json.dumps(doc, sort_keys=True, separators=(",", ":"))


def test_minimal_config_omits_unset_fields() -> None:
    doc = json.loads(ImageConfig(os="linux", architecture="amd64").to_json())
    assert doc == {
        "os": "linux",
        "architecture": "amd64",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": []},
    }
    # An explicitly empty Cmd is kept: it clears an inherited one.
    assert json.loads(ImageConfig(os="linux", architecture="amd64", cmd=[]).to_json())[
        "config"
    ] == {"Cmd": []}


def test_config_without_os_is_rejected() -> None:
    with pytest.raises(ValueError, match="os and architecture"):
        ImageConfig(os="", architecture="amd64").to_json()


def test_image_export_attrs() -> None:
    cfg = ImageConfig(os="linux", architecture="amd64")
    pb = ImageExport(
        names=["127.0.0.1:5000/team/app:1", "127.0.0.1:5000/team/app:latest"],
        push=True,
        config=cfg,
        insecure_registry=True,
        oci_mediatypes=True,
        compression="zstd",
        attrs={"annotation.org.opencontainers.image.title": "app"},
    ).to_pb()
    assert pb.Type == "image"
    assert dict(pb.Attrs) == {
        "name": "127.0.0.1:5000/team/app:1,127.0.0.1:5000/team/app:latest",
        "push": "true",
        "registry.insecure": "true",
        "oci-mediatypes": "true",
        "compression": "zstd",
        "containerimage.config": cfg.to_json(),
        "annotation.org.opencontainers.image.title": "app",
    }
    assert dict(ImageExport(names=[]).to_pb().Attrs) == {"push": "false"}


def test_generic_exporter() -> None:
    pb = Exporter("oci", {"dest": "/out.tar"}).to_pb()
    assert (pb.Type, dict(pb.Attrs)) == ("oci", {"dest": "/out.tar"})


def test_registry_cache_entries() -> None:
    cache = RegistryCache("127.0.0.1:5000/team/app:cache", insecure=True, ignore_error=True)
    export = cache.export_entry()
    assert export.Type == "registry"
    assert dict(export.Attrs) == {
        "ref": "127.0.0.1:5000/team/app:cache",
        "mode": "max",
        "image-manifest": "true",
        "registry.insecure": "true",
        "ignore-error": "true",
    }
    imported = cache.import_entry()
    assert dict(imported.Attrs) == {
        "ref": "127.0.0.1:5000/team/app:cache",
        "registry.insecure": "true",
    }
    assert dict(RegistryCache("r/x:c", mode="min").export_entry().Attrs)["mode"] == "min"
    with pytest.raises(ValueError, match="min or max"):
        RegistryCache("r/x:c", mode="maximum")


def test_solve_result_parsing() -> None:
    descriptor = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": "sha256:" + "a" * 64,
        "size": 480,
        "platform": {"architecture": "amd64", "os": "linux"},
    }
    result = SolveResult(
        ref="r",
        exporter_response={
            "containerimage.digest": "sha256:" + "a" * 64,
            "containerimage.config.digest": "sha256:" + "b" * 64,
            "containerimage.descriptor": base64.b64encode(json.dumps(descriptor).encode()).decode(),
            "image.name": "reg/app:1,reg/app:latest",
            "cache.manifest": json.dumps({"digest": "sha256:" + "c" * 64, "size": 9}),
        },
    )
    assert result.image_digest == "sha256:" + "a" * 64
    assert result.config_digest == "sha256:" + "b" * 64
    assert result.image_names == ["reg/app:1", "reg/app:latest"]
    d = result.descriptor
    assert d is not None
    assert (d.media_type, d.digest, d.size) == (descriptor["mediaType"], "sha256:" + "a" * 64, 480)
    assert d.platform == {"architecture": "amd64", "os": "linux"}
    cache = result.cache_manifest
    assert cache is not None
    assert cache["size"] == 9


def test_solve_result_without_exporter() -> None:
    result = SolveResult(ref="r", exporter_response={})
    assert result.image_digest is None
    assert result.descriptor is None
    assert result.cache_manifest is None
    assert result.image_names == []


def test_malformed_descriptor_is_reported() -> None:
    result = SolveResult(ref="r", exporter_response={"containerimage.descriptor": "not base64!"})
    with pytest.raises(ValueError, match=r"malformed containerimage\.descriptor"):
        _ = result.descriptor
