"""A fake kubelet: runs the test cluster's pods as local processes.

Owns: picking up Pending pods in one namespace, materialising what a kubelet would
give the container (env incl. Downward API and Secret/ConfigMap references, Secret,
ConfigMap, projected and emptyDir volumes, a ServiceAccount token bound to the pod),
running the container's command as a subprocess with its output kept per pod, and
reporting phase Running, then Succeeded or Failed from the exit code. The real Job,
TTL and garbage-collector controllers do the rest.

How paths map (no container, no mount namespace): each volume is written to a
directory of its own under the pod's work dir, and any env value equal to or under a
volumeMount's mountPath is rewritten to that directory (so DOCKER_CONFIG=/docker
points at the materialised Secret). The ServiceAccount mount is also announced as
LUCITY_SERVICEACCOUNT_DIR, which build_runner.annotate reads instead of the fixed
in-cluster path. KUBERNETES_SERVICE_HOST/PORT point at the loopback apiserver.

Not modelled: images (the command must name a program on this machine; this
project's console scripts and `python` resolve to the venv), init and sidecar
containers, restarts (restartPolicy OnFailure behaves like Never), resource limits,
security contexts (processes run as the test user), probes and the pod logs API.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import logging
import os
import re
import shutil
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client

from tests.testbed.kube import mint_token

log = logging.getLogger(__name__)

SERVICEACCOUNT_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
SERVICEACCOUNT_DIR_ENV = "LUCITY_SERVICEACCOUNT_DIR"
# Programs the pods may run: this project's venv first (its `python` and console
# scripts stand in for the image), then the system.
VENV_BIN = Path(sys.executable).parent
POD_PATH = f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin"
# Kubernetes' $(VAR) expansion in env values, command and args; $$ escapes.
_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
_FIELD_KEY = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


class PodSetupError(Exception):
    """The pod asks for something the fake kubelet cannot (or must not) provide."""


@dataclass(frozen=True)
class PodRun:
    """What happened to one pod the fake kubelet ran."""

    name: str
    uid: str
    labels: Mapping[str, str]
    exit_code: int
    log_path: Path
    # Why the container never ran or was killed; "" for a normal exit.
    reason: str = ""

    def log(self) -> str:
        """The container's stdout and stderr as kept by the fake kubelet."""
        return self.log_path.read_text(errors="replace")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes $(VAR) expansion: known names are replaced, unknown ones kept, $$ -> $."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _VAR_REF.sub(substitute, text)


def field_value(pod: client.V1Pod, field_path: str) -> str:
    """The Downward API value of field_path for pod (the subset kubelet supports for env)."""
    meta = pod.metadata
    simple = {
        "metadata.name": meta.name,
        "metadata.namespace": meta.namespace,
        "metadata.uid": meta.uid,
        "spec.serviceAccountName": pod.spec.service_account_name,
        "spec.nodeName": pod.spec.node_name,
        # No node, no addresses: a real kubelet would fill these.
        "status.podIP": "",
        "status.hostIP": "",
    }
    if field_path in simple:
        return simple[field_path] or ""
    if match := _FIELD_KEY.match(field_path):
        source = (meta.labels if match.group(1) == "labels" else meta.annotations) or {}
        return str(source.get(match.group(2), ""))
    raise PodSetupError(f"unsupported fieldRef {field_path!r}")


def remap_path(value: str, mounts: Mapping[str, Path]) -> str:
    """Rewrite a container path under one of mounts (mountPath -> host dir) to the host."""
    for mount_path in sorted(mounts, key=len, reverse=True):
        prefix = mount_path.rstrip("/")
        if value == prefix or value.startswith(prefix + "/"):
            return str(mounts[mount_path]) + value[len(prefix) :]
    return value


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class FakeKubelet:
    """Plays kubelet for every pod created in namespace, until cancelled."""

    api: client.ApiClient
    namespace: str
    apiserver_port: int
    workdir: Path
    poll_interval_s: float = 0.2
    # Grace between SIGTERM and SIGKILL when a running pod is deleted (Job deleted,
    # deadline hit): the kubelet default is 30 s, tests want it shorter.
    kill_grace_s: float = 5.0
    runs: dict[str, PodRun] = field(default_factory=dict)
    # Our own failures (not the pods'): a test bed bug must fail the tests.
    errors: list[BaseException] = field(default_factory=list)
    _seen: set[str] = field(default_factory=set)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def run(self) -> None:
        """Poll for new Pending pods and run each in its own task until cancelled."""
        try:
            await self._poll()
        except Exception as exc:
            # Waiting tests would otherwise time out without saying why.
            await self._fail(exc)
            raise

    async def _poll(self) -> None:
        core = client.CoreV1Api(self.api)
        async with asyncio.TaskGroup() as tasks:
            while True:
                pods = await core.list_namespaced_pod(self.namespace)
                for pod in pods.items:
                    uid = pod.metadata.uid
                    if uid in self._seen or pod.metadata.deletion_timestamp:
                        continue
                    if (pod.status.phase or "Pending") != "Pending":
                        continue
                    self._seen.add(uid)
                    tasks.create_task(self._guarded(pod), name=f"pod {pod.metadata.name}")
                await asyncio.sleep(self.poll_interval_s)

    async def wait_for_run(self, *, job_name: str, timeout_s: float = 60.0) -> PodRun:
        """The first finished run of a pod belonging to job_name."""

        def found() -> PodRun | None:
            for run in self.runs.values():
                if run.labels.get("batch.kubernetes.io/job-name") == job_name:
                    return run
            return None

        try:
            async with asyncio.timeout(timeout_s), self._changed:
                await self._changed.wait_for(lambda: found() is not None or bool(self.errors))
        except TimeoutError:
            raise AssertionError(
                f"no pod of Job {job_name} finished within {timeout_s:.0f}s; "
                f"pods run so far: {sorted(self.runs)}"
            ) from None
        run = found()
        if run is None:
            raise AssertionError(f"the fake kubelet failed: {self.errors!r}") from self.errors[0]
        return run

    async def _fail(self, exc: BaseException) -> None:
        async with self._changed:
            self.errors.append(exc)
            self._changed.notify_all()

    async def _guarded(self, pod: client.V1Pod) -> None:
        # One broken pod must not take the other pods (TaskGroup) down with it.
        try:
            run = await self._run_pod(pod)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("fake kubelet failed on pod %s", pod.metadata.name)
            await self._fail(exc)
            return
        async with self._changed:
            self.runs[run.name] = run
            self._changed.notify_all()

    async def _run_pod(self, pod: client.V1Pod) -> PodRun:
        name, uid = pod.metadata.name, pod.metadata.uid
        pod_dir = self.workdir / self.namespace / f"{name}-{uid[:8]}"
        pod_dir.mkdir(parents=True)
        log_path = pod_dir / "container.log"
        log_path.touch()
        core = client.CoreV1Api(self.api)

        def finish(exit_code: int, reason: str) -> PodRun:
            return PodRun(
                name=name,
                uid=uid,
                labels=dict(pod.metadata.labels or {}),
                exit_code=exit_code,
                log_path=log_path,
                reason=reason,
            )

        try:
            spec = _single_container(pod)
            volumes = await self._materialise_volumes(pod, pod_dir)
            mounts = {m.mount_path: volumes[m.name] for m in spec.volume_mounts or []}
            env = await self._environment(pod, spec, mounts, home=pod_dir / "home")
            argv = [expand(a, env) for a in [*(spec.command or []), *(spec.args or [])]]
            if not argv:
                raise PodSetupError("no command: the fake kubelet cannot read image entrypoints")
            program = shutil.which(argv[0], path=env["PATH"])
            if program is None:
                raise PodSetupError(f"{argv[0]!r} is not on the pod's PATH ({env['PATH']})")
        except PodSetupError as exc:
            log_path.write_text(f"fake kubelet: {exc}\n")
            await self._set_terminated(core, pod, exit_code=128, reason="CreateContainerError")
            return finish(128, str(exc))

        cwd = Path(remap_path(spec.working_dir, mounts)) if spec.working_dir else pod_dir / "home"
        cwd.mkdir(parents=True, exist_ok=True)
        started = _now()
        await self._patch_status(
            core,
            pod,
            {
                "phase": "Running",
                "startTime": started,
                "containerStatuses": [
                    _container_status(spec, ready=True, state={"running": {"startedAt": started}})
                ],
            },
        )
        with log_path.open("ab") as out:
            process = await asyncio.create_subprocess_exec(
                program,
                *argv[1:],
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        try:
            deleted = await self._wait(core, pod, process)
        finally:
            if process.returncode is None:
                await self._kill(process)
        exit_code = process.returncode if process.returncode is not None else 137
        if exit_code < 0:  # killed by a signal: report it the way container runtimes do
            exit_code = 128 - exit_code
        if deleted:
            return finish(exit_code, "pod deleted while running")
        await self._set_terminated(
            core,
            pod,
            exit_code=exit_code,
            reason="Completed" if exit_code == 0 else "Error",
            started=started,
        )
        return finish(exit_code, "")

    async def _wait(
        self, core: client.CoreV1Api, pod: client.V1Pod, process: asyncio.subprocess.Process
    ) -> bool:
        """Wait for the process; True if the pod was deleted first (then it is killed)."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), timeout=0.5)
                return False
            if await self._pod_gone(core, pod):
                await self._kill(process)
                return True

    async def _pod_gone(self, core: client.CoreV1Api, pod: client.V1Pod) -> bool:
        try:
            current = await core.read_namespaced_pod(pod.metadata.name, self.namespace)
        except client.ApiException as exc:
            if exc.status == 404:
                return True
            raise
        return bool(current.metadata.uid != pod.metadata.uid or current.metadata.deletion_timestamp)

    async def _kill(self, process: asyncio.subprocess.Process) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout=self.kill_grace_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()

    async def _set_terminated(
        self,
        core: client.CoreV1Api,
        pod: client.V1Pod,
        *,
        exit_code: int,
        reason: str,
        started: str | None = None,
    ) -> None:
        spec = pod.spec.containers[0]
        finished = _now()
        terminated = {
            "exitCode": exit_code,
            "reason": reason,
            "startedAt": started or finished,
            "finishedAt": finished,
        }
        await self._patch_status(
            core,
            pod,
            {
                "phase": "Succeeded" if exit_code == 0 else "Failed",
                "startTime": started or finished,
                "containerStatuses": [
                    _container_status(spec, ready=False, state={"terminated": terminated})
                ],
            },
        )

    async def _patch_status(
        self, core: client.CoreV1Api, pod: client.V1Pod, status: dict[str, Any]
    ) -> None:
        try:
            await core.patch_namespaced_pod_status(
                pod.metadata.name,
                self.namespace,
                {"status": status},
                # The generated client guesses strategic merge for dicts; a merge
                # patch replaces containerStatuses wholesale, which is what we mean.
                _content_type="application/merge-patch+json",
            )  # type: ignore[call-arg]  # the stubs omit the runtime's _content_type
        except client.ApiException as exc:
            if exc.status == 404:  # deleted meanwhile (Job cancelled): nothing to report
                return
            raise

    async def _environment(
        self,
        pod: client.V1Pod,
        spec: client.V1Container,
        mounts: Mapping[str, Path],
        *,
        home: Path,
    ) -> dict[str, str]:
        home.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - local tmp dir, instant
        # The order is kubelet's: its own and the service variables, then envFrom,
        # then env (later wins); each value may refer to the ones before it.
        env: dict[str, str] = {
            "PATH": POD_PATH,
            "HOME": str(home),
            "HOSTNAME": pod.metadata.name,
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": str(self.apiserver_port),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(self.apiserver_port),
        }
        if SERVICEACCOUNT_MOUNT in mounts:
            env[SERVICEACCOUNT_DIR_ENV] = str(mounts[SERVICEACCOUNT_MOUNT])
        for source in spec.env_from or []:
            data = await self._source_data(source.secret_ref, source.config_map_ref)
            env.update({f"{source.prefix or ''}{k}": v for k, v in data.items()})
        for var in spec.env or []:
            if var.value_from is None:
                value = expand(var.value or "", env)
            else:
                value = await self._env_value(pod, var)
            env[var.name] = remap_path(value, mounts)
        return env

    async def _env_value(self, pod: client.V1Pod, var: client.V1EnvVar) -> str:
        source = var.value_from
        if source.field_ref is not None:
            return field_value(pod, source.field_ref.field_path)
        ref = source.secret_key_ref or source.config_map_key_ref
        if ref is None:
            raise PodSetupError(f"env {var.name}: unsupported valueFrom")
        data = await self._object_data(
            kind="Secret" if source.secret_key_ref is not None else "ConfigMap",
            name=ref.name,
            optional=bool(ref.optional),
        )
        if ref.key not in data:
            if ref.optional:
                return ""
            raise PodSetupError(f"env {var.name}: key {ref.key!r} not in {ref.name}")
        return data[ref.key]

    async def _source_data(
        self, secret_ref: Any | None, config_map_ref: Any | None
    ) -> dict[str, str]:
        ref = secret_ref or config_map_ref
        if ref is None:
            raise PodSetupError("envFrom needs a secretRef or a configMapRef")
        return await self._object_data(
            kind="Secret" if secret_ref is not None else "ConfigMap",
            name=ref.name,
            optional=bool(ref.optional),
        )

    async def _object_data(self, *, kind: str, name: str, optional: bool) -> dict[str, str]:
        """The decoded data of a Secret or ConfigMap; {} if optional and missing."""
        return {
            k: v.decode(errors="replace")
            for k, v in (await self._object_bytes(kind, name, optional)).items()
        }

    async def _object_bytes(self, kind: str, name: str, optional: bool) -> dict[str, bytes]:
        core = client.CoreV1Api(self.api)
        try:
            if kind == "Secret":
                secret = await core.read_namespaced_secret(name, self.namespace)
                return {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}
            config_map = await core.read_namespaced_config_map(name, self.namespace)
            data = {k: v.encode() for k, v in (config_map.data or {}).items()}
            data.update({k: base64.b64decode(v) for k, v in (config_map.binary_data or {}).items()})
            return data
        except client.ApiException as exc:
            if exc.status == 404 and optional:
                return {}
            if exc.status == 404:
                # A real kubelet would keep the pod in ContainerCreating and retry;
                # for tests, failing fast with the reason is more useful.
                raise PodSetupError(f"{kind} {name} not found") from exc
            raise

    async def _materialise_volumes(self, pod: client.V1Pod, pod_dir: Path) -> dict[str, Path]:
        """Write every volume of the pod to its own directory; return name -> directory."""
        result: dict[str, Path] = {}
        for volume in pod.spec.volumes or []:
            target = pod_dir / "volumes" / volume.name
            target.mkdir(parents=True)
            if volume.secret is not None:
                source = volume.secret
                data = await self._object_bytes("Secret", source.secret_name, bool(source.optional))
                _write_items(target, data, source.items, source.default_mode)
            elif volume.config_map is not None:
                source = volume.config_map
                data = await self._object_bytes("ConfigMap", source.name, bool(source.optional))
                _write_items(target, data, source.items, source.default_mode)
            elif volume.empty_dir is not None:
                pass
            elif volume.projected is not None:
                await self._materialise_projected(pod, volume.projected, target)
            else:
                raise PodSetupError(
                    f"volume {volume.name}: only secret, configMap, emptyDir "
                    "and projected volumes are supported"
                )
            result[volume.name] = target
        return result

    async def _materialise_projected(
        self, pod: client.V1Pod, projected: client.V1ProjectedVolumeSource, target: Path
    ) -> None:
        for source in projected.sources or []:
            if source.service_account_token is not None:
                token_source = source.service_account_token
                # TokenRequest bound to this pod, exactly what kubelet asks for: the
                # token names the pod and stops working when the pod is deleted.
                token = await mint_token(
                    self.api,
                    namespace=self.namespace,
                    service_account=pod.spec.service_account_name or "default",
                    pod=pod,
                    expiration_s=token_source.expiration_seconds or 3607,
                )
                _write_file(target / token_source.path, token.encode(), projected.default_mode)
            elif source.config_map is not None or source.secret is not None:
                ref = source.config_map or source.secret
                kind = "ConfigMap" if source.config_map is not None else "Secret"
                data = await self._object_bytes(kind, ref.name, bool(ref.optional))
                _write_items(target, data, ref.items, projected.default_mode)
            elif source.downward_api is not None:
                for item in source.downward_api.items or []:
                    if item.field_ref is None:
                        raise PodSetupError("projected downwardAPI: only fieldRef is supported")
                    value = field_value(pod, item.field_ref.field_path)
                    _write_file(target / item.path, value.encode(), projected.default_mode)
            else:
                raise PodSetupError("unsupported projected volume source")


def _single_container(pod: client.V1Pod) -> client.V1Container:
    if pod.spec.init_containers or len(pod.spec.containers) != 1:
        raise PodSetupError("the fake kubelet runs exactly one container and no init containers")
    container: client.V1Container = pod.spec.containers[0]
    return container


def _container_status(
    spec: client.V1Container, *, ready: bool, state: dict[str, Any]
) -> dict[str, Any]:
    return {
        "name": spec.name,
        "image": spec.image,
        "imageID": "",
        "ready": ready,
        "started": ready,
        "restartCount": 0,
        "state": state,
    }


def _write_items(
    target: Path, data: Mapping[str, bytes], items: list[Any] | None, mode: int | None
) -> None:
    if items:
        for item in items:
            if item.key not in data:
                raise PodSetupError(f"volume item key {item.key!r} not found")
            _write_file(target / item.path, data[item.key], item.mode or mode)
    else:
        for key, value in data.items():
            _write_file(target / key, value, mode)


def _write_file(path: Path, data: bytes, mode: int | None) -> None:
    if ".." in path.parts:
        raise PodSetupError(f"volume path {path} escapes its volume")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode if mode is not None else 0o644)
