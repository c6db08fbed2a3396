"""A real, node-less Kubernetes control plane on loopback, and ways to talk to it.

Owns: starting and stopping etcd, kube-apiserver and kube-controller-manager as local
processes (binaries from scripts/install-testbed.sh), kubeconfigs and client
Configurations per identity, ServiceAccount token minting (TokenRequest), server-side
apply of rendered manifests, and running helm. It never fakes an API: RBAC,
admission and the controllers are the real ones. It does not play kubelet (node.py).
"""

from __future__ import annotations

import base64
import ssl
import subprocess
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes_asyncio import client

from tests.testbed.pki import ADMIN_USER, Pki, create_pki
from tests.testbed.process import REPO, Daemon, binary, free_port, pinned_versions

CHART_DIR = REPO / "deploy" / "helm" / "lucity-builder"
# The issuer is also the default audience of every token the apiserver mints, so
# in-cluster style clients (our runner) need not name one.
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
SERVICE_CIDR = "10.96.0.0/24"
# The controllers the issue asks for, by their canonical names (kube-controller-manager
# names/controller_names.go). Node-related ones (node-lifecycle, podgc, taint-eviction)
# stay off on purpose: with no nodes they would delete or evict our unscheduled pods.
CONTROLLERS = (
    "job-controller",
    "ttl-after-finished-controller",
    "garbage-collector-controller",
    "serviceaccount-controller",
    "namespace-controller",
    "root-ca-certificate-publisher-controller",
)


class KubeTestbedError(RuntimeError):
    """The test cluster answered something a fixture or helper could not work with."""


def _kubeconfig(*, server: str, ca_pem: bytes, user: str, credentials: dict[str, str]) -> str:
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "lucity-test",
                "cluster": {
                    "server": server,
                    "certificate-authority-data": base64.b64encode(ca_pem).decode(),
                },
            }
        ],
        "users": [{"name": user, "user": credentials}],
        "contexts": [{"name": user, "context": {"cluster": "lucity-test", "user": user}}],
        "current-context": user,
    }
    return yaml.safe_dump(doc, sort_keys=False)


@dataclass
class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager, started in workdir."""

    workdir: Path
    startup_timeout_s: float = 120.0
    pki: Pki = field(init=False)
    port: int = field(init=False, default=0)
    _daemons: list[Daemon] = field(init=False, default_factory=list)
    _etcd_url: str = field(init=False, default="")

    @property
    def url(self) -> str:
        """The apiserver's HTTPS base URL."""
        return f"https://127.0.0.1:{self.port}"

    @property
    def admin_kubeconfig(self) -> Path:
        """A kubeconfig file for the system:masters admin (for humans debugging a run)."""
        return self.workdir / "admin.kubeconfig"

    def start(self) -> None:
        """Start all three daemons and wait until each is ready; blocking."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.pki = create_pki(self.workdir / "pki")
        try:
            self._start_etcd()
            self._start_apiserver()
            self._start_controller_manager()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the daemons in reverse start order."""
        while self._daemons:
            self._daemons.pop().stop()

    def _logs(self) -> Path:
        return self.workdir / "logs"

    def _start_etcd(self) -> None:
        client_port, peer_port = free_port(), free_port()
        etcd = Daemon(
            name="etcd",
            argv=[
                str(binary("etcd", "etcd")),
                "--name=lucity-test",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{client_port}",
                f"--advertise-client-urls=http://127.0.0.1:{client_port}",
                f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-cluster=lucity-test=http://127.0.0.1:{peer_port}",
                # Durability is worthless for a throw-away cluster; fsync is what
                # makes etcd slow on a shared CI disk.
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
            log_path=self._logs() / "etcd.log",
        ).start()
        self._daemons.append(etcd)
        etcd.wait_ready(lambda: _http_ok(f"http://127.0.0.1:{client_port}/health"), timeout_s=30)
        self._etcd_url = f"http://127.0.0.1:{client_port}"

    def _start_apiserver(self) -> None:
        self.port = free_port()
        pki = self.pki
        apiserver = Daemon(
            name="kube-apiserver",
            argv=[
                str(binary("kubernetes", "kube-apiserver")),
                f"--etcd-servers={self._etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.port}",
                f"--cert-dir={self.workdir / 'apiserver-certs'}",
                f"--tls-cert-file={pki.apiserver.cert}",
                f"--tls-private-key-file={pki.apiserver.key}",
                f"--client-ca-file={pki.ca.cert}",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={pki.service_account_pub}",
                f"--service-account-signing-key-file={pki.service_account_key}",
                # Explicit, never the default: with AlwaysAllow every RBAC test
                # would pass vacuously (test_kube_rbac.py has the canary).
                "--authorization-mode=Node,RBAC",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                # No node will ever serve the `kubernetes` Service endpoints.
                "--endpoint-reconciler-type=none",
                "--allow-privileged=false",
                "--profiling=false",
                f"--audit-log-path={self._logs() / 'audit.log'}",
                f"--audit-policy-file={self._write_audit_policy()}",
            ],
            log_path=self._logs() / "kube-apiserver.log",
        ).start()
        self._daemons.append(apiserver)
        context = self.admin_ssl_context()
        apiserver.wait_ready(
            lambda: _http_ok(f"{self.url}/readyz", context=context),
            timeout_s=self.startup_timeout_s,
        )
        self.admin_kubeconfig.write_text(
            _kubeconfig(
                server=self.url,
                ca_pem=pki.ca.cert.read_bytes(),
                user=ADMIN_USER,
                credentials={
                    "client-certificate-data": _b64(pki.admin.cert),
                    "client-key-data": _b64(pki.admin.key),
                },
            )
        )

    def _write_audit_policy(self) -> Path:
        # Who did what to Jobs, Pods and tokens is the first thing to look at when
        # an RBAC or hand-off test fails; reads of everything else are noise.
        path = self.workdir / "audit-policy.yaml"
        policy = {
            "apiVersion": "audit.k8s.io/v1",
            "kind": "Policy",
            "omitStages": ["RequestReceived"],
            "rules": [
                {"level": "None", "verbs": ["get", "list", "watch"]},
                {"level": "Metadata"},
            ],
        }
        self._logs().mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(policy))
        return path

    def _start_controller_manager(self) -> None:
        pki = self.pki
        kubeconfig = self.workdir / "kube-controller-manager.kubeconfig"
        kubeconfig.write_text(
            _kubeconfig(
                server=self.url,
                ca_pem=pki.ca.cert.read_bytes(),
                user="kube-controller-manager",
                credentials={
                    "client-certificate-data": _b64(pki.controller_manager.cert),
                    "client-key-data": _b64(pki.controller_manager.key),
                },
            )
        )
        health_port = free_port()
        kcm = Daemon(
            name="kube-controller-manager",
            argv=[
                str(binary("kubernetes", "kube-controller-manager")),
                f"--kubeconfig={kubeconfig}",
                f"--controllers={','.join(CONTROLLERS)}",
                # Each controller acts as its own ServiceAccount under the bootstrap
                # roles, as on kubeadm clusters; tokens come from TokenRequest.
                "--use-service-account-credentials=true",
                f"--root-ca-file={pki.ca.cert}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={health_port}",
                f"--cert-dir={self.workdir / 'kcm-certs'}",
                "--profiling=false",
            ],
            log_path=self._logs() / "kube-controller-manager.log",
        ).start()
        self._daemons.append(kcm)
        insecure = ssl.create_default_context()
        # Its serving cert is self-signed on the fly; we only ask "are you up".
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE
        kcm.wait_ready(
            lambda: _http_ok(f"https://127.0.0.1:{health_port}/healthz", context=insecure),
            timeout_s=self.startup_timeout_s,
        )

    def admin_ssl_context(self) -> ssl.SSLContext:
        """TLS context trusting our CA and presenting the admin client certificate."""
        context = ssl.create_default_context(cafile=str(self.pki.ca.cert))
        context.load_cert_chain(str(self.pki.admin.cert), str(self.pki.admin.key))
        return context

    def admin_configuration(self) -> client.Configuration:
        """A client Configuration authenticated as the system:masters admin."""
        config = client.Configuration(host=self.url, ssl_ca_cert=str(self.pki.ca.cert))
        config.cert_file = str(self.pki.admin.cert)
        config.key_file = str(self.pki.admin.key)
        return config

    def token_configuration(self, token: str) -> client.Configuration:
        """A client Configuration authenticated by a bearer token (e.g. a ServiceAccount's)."""
        return client.Configuration(
            host=self.url,
            ssl_ca_cert=str(self.pki.ca.cert),
            api_key={"BearerToken": token},
            api_key_prefix={"BearerToken": "Bearer"},
        )

    def write_token_kubeconfig(self, path: Path, *, user: str, token: str) -> Path:
        """Write a kubeconfig that authenticates with token, for a process acting as user."""
        path.write_text(
            _kubeconfig(
                server=self.url,
                ca_pem=self.pki.ca.cert.read_bytes(),
                user=user,
                credentials={"token": token},
            )
        )
        path.chmod(0o600)
        return path


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _http_ok(url: str, *, context: ssl.SSLContext | None = None) -> bool:
    with urllib.request.urlopen(url, timeout=2, context=context) as response:
        return bool(response.status == 200)


async def mint_token(
    api: client.ApiClient,
    *,
    namespace: str,
    service_account: str,
    pod: client.V1Pod | None = None,
    expiration_s: int = 3600,
) -> str:
    """A token for namespace/service_account from the TokenRequest API.

    With pod, the token is bound to that pod like a kubelet-projected one: it names
    the pod in its claims and dies with the pod.
    """
    bound = None
    if pod is not None:
        bound = client.V1BoundObjectReference(
            api_version="v1", kind="Pod", name=pod.metadata.name, uid=pod.metadata.uid
        )
    request = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(
            audiences=[SERVICE_ACCOUNT_ISSUER],
            expiration_seconds=expiration_s,
            bound_object_ref=bound,
        )
    )
    try:
        response = await client.CoreV1Api(api).create_namespaced_service_account_token(
            service_account, namespace, request
        )
    except client.ApiException as exc:
        raise KubeTestbedError(
            f"TokenRequest for {namespace}/{service_account} failed: {exc.status} {exc.reason}"
        ) from exc
    token: str = response.status.token
    return token


@dataclass(frozen=True)
class _Resource:
    plural: str
    namespaced: bool


async def _discover(api: client.ApiClient, api_version: str) -> dict[str, _Resource]:
    path = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    try:
        body = await api.call_api(
            path,
            "GET",
            auth_settings=["BearerToken"],
            response_types_map={200: "object"},
            _return_http_data_only=True,
        )
    except client.ApiException as exc:
        raise KubeTestbedError(f"discovery of {api_version} failed: {exc.status}") from exc
    return {
        r["kind"]: _Resource(plural=r["name"], namespaced=r["namespaced"])
        for r in body["resources"]
        if "/" not in r["name"]  # subresources such as pods/log
    }


async def apply_objects(
    api: client.ApiClient,
    objects: Iterable[Mapping[str, Any]],
    *,
    field_manager: str = "lucity-tests",
) -> list[dict[str, Any]]:
    """Server-side apply each object (kubectl apply --server-side) and return the results.

    Resource paths come from API discovery, so any kind the server serves works.
    """
    known: dict[str, dict[str, _Resource]] = {}
    applied: list[dict[str, Any]] = []
    for obj in objects:
        api_version, kind = obj["apiVersion"], obj["kind"]
        if api_version not in known:
            known[api_version] = await _discover(api, api_version)
        resource = known[api_version].get(kind)
        if resource is None:
            raise KubeTestbedError(f"the apiserver serves no {kind} in {api_version}")
        base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
        name = obj["metadata"]["name"]
        if resource.namespaced:
            namespace = obj["metadata"].get("namespace")
            if not namespace:
                raise KubeTestbedError(f"{kind}/{name} has no metadata.namespace")
            path = f"{base}/namespaces/{namespace}/{resource.plural}/{name}"
        else:
            path = f"{base}/{resource.plural}/{name}"
        try:
            result = await api.call_api(
                path,
                "PATCH",
                query_params=[("fieldManager", field_manager), ("force", "true")],
                header_params={
                    "Content-Type": "application/apply-patch+yaml",
                    "Accept": "application/json",
                },
                body=dict(obj),
                auth_settings=["BearerToken"],
                response_types_map={200: "object", 201: "object"},
                _return_http_data_only=True,
            )
        except client.ApiException as exc:
            raise KubeTestbedError(
                f"apply {kind}/{name} failed: {exc.status} {exc.reason}: {exc.body!r}"
            ) from exc
        applied.append(result)
    return applied


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the pinned helm binary offline; raise with its output if it fails."""
    argv = [str(binary("helm", "helm")), *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        raise KubeTestbedError(
            f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result


def render_chart(
    chart: Path = CHART_DIR,
    *,
    release: str = "lucity-builder",
    namespace: str = "lucity-system",
    set_values: Sequence[str] = (),
    kube_version: str | None = None,
) -> list[dict[str, Any]]:
    """`helm template` the chart and return its objects as dicts.

    kube_version defaults to the pinned test-bed release: helm built by `go install`
    carries no version stamp and would otherwise assume Kubernetes v1.20.
    """
    version = kube_version or pinned_versions()["K8S_VERSION"]
    args = ["template", release, str(chart), "--namespace", namespace, "--kube-version", version]
    for value in set_values:
        args += ["--set", value]
    rendered = helm(*args).stdout
    return [doc for doc in yaml.safe_load_all(rendered) if doc]
