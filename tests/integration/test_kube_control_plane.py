"""The control plane fixture itself: the pinned release, and loud, clean failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from kubernetes_asyncio import client

from tests.testbed.kube import ControlPlane
from tests.testbed.process import DaemonError, binary, pinned_versions


async def test_apiserver_is_the_pinned_release(kube_admin: client.ApiClient) -> None:
    version = await client.VersionApi(kube_admin).get_code()
    assert version.git_version == pinned_versions()["K8S_VERSION"]


def test_missing_binary_fails_loudly_and_stops_what_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """etcd is there, kube-apiserver is not: a clear error, and etcd is not left behind."""
    etcd = binary("etcd", "etcd")
    cache = tmp_path / "cache"
    only_etcd = cache / "bin" / "etcd" / pinned_versions()["ETCD_VERSION"]
    only_etcd.mkdir(parents=True)
    (only_etcd / "etcd").symlink_to(etcd)
    monkeypatch.setenv("LUCITY_CACHE", str(cache))

    plane = ControlPlane(workdir=tmp_path / "plane")
    with pytest.raises(DaemonError, match=r"kube-apiserver .* is not installed.*install-testbed"):
        plane.start()
    # etcd had started; start() must have stopped it before raising.
    log = (tmp_path / "plane" / "logs" / "etcd.log").read_text()
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    etcd_running = False
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if str(tmp_path / "plane" / "etcd").encode() in cmdline:
            etcd_running = True
    assert not etcd_running, log
