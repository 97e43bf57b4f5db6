"""An async client of the Firecracker API on its unix socket: one method per endpoint.

Firecracker answers 204 (or 200 with JSON) on success and 4xx with
``{"fault_message": ...}`` on failure; failures and an unreachable socket
become :class:`metald.core.errors.BackendError` carrying that message.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import httpx

from metald.backends.firecracker import bodies, snapshot_bodies
from metald.core.errors import BackendError
from metald.core.models import RateLimit


class FirecrackerApiError(BackendError):
    """Firecracker refused a request; ``fault_message`` is its own words."""

    def __init__(self, method: str, path: str, status: int, fault_message: str) -> None:
        super().__init__(f"firecracker {method} {path}: {fault_message}")
        self.method = method
        self.path = path
        self.status = status
        self.fault_message = fault_message


# sun_path holds 107 bytes and a NUL; a jail's socket can be longer
# (<chroot_dir>/firecracker/<64-char vm id>/root/run/firecracker.socket).
MAX_SUN_PATH = 107


class FirecrackerClient:
    def __init__(
        self,
        socket_path: Path,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.socket_path = socket_path
        self._dir_fd: int | None = None
        self._http = httpx.AsyncClient(
            transport=transport or httpx.AsyncHTTPTransport(uds=self._connect_path(socket_path)),
            base_url="http://localhost",
            timeout=timeout,
        )

    def _connect_path(self, socket_path: Path) -> str:
        """The path to connect to: ``/proc/self/fd/<dir fd>/<name>`` when the real one is too long."""
        if len(os.fsencode(socket_path)) <= MAX_SUN_PATH:
            return str(socket_path)
        try:
            self._dir_fd = os.open(socket_path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return str(socket_path)  # connecting fails with a clear error
        return f"/proc/self/fd/{self._dir_fd}/{socket_path.name}"

    async def close(self) -> None:
        await self._http.aclose()
        if self._dir_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._dir_fd)
            self._dir_fd = None

    async def __aenter__(self) -> FirecrackerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            response = await self._http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise BackendError(f"firecracker API at {self.socket_path} unreachable ({method} {path}): {exc!r}") from exc
        if response.status_code >= 300:
            raise FirecrackerApiError(method, path, response.status_code, _fault(response))
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    # --- reads --------------------------------------------------------------------
    async def describe_instance(self) -> dict[str, Any]:
        """GET / (InstanceInfo: id, state, vmm_version, app_name)."""
        return await self._call("GET", "/")

    async def version(self) -> str:
        """GET /version."""
        return str((await self._call("GET", "/version"))["firecracker_version"])

    # --- pre-boot configuration ---------------------------------------------------
    async def put_logger(self, log_path: str) -> None:
        await self._call("PUT", "/logger", bodies.logger(log_path))

    async def put_metrics(self, metrics_path: str) -> None:
        await self._call("PUT", "/metrics", bodies.metrics(metrics_path))

    async def put_machine_config(self, vcpu_count: int, mem_size_mib: int) -> None:
        await self._call("PUT", "/machine-config", bodies.machine_config(vcpu_count, mem_size_mib))

    async def put_boot_source(self, kernel_image_path: str, initrd_path: str | None, boot_args: str) -> None:
        body = bodies.boot_source(kernel_image_path, initrd_path, boot_args)
        await self._call("PUT", "/boot-source", body)

    async def put_drive(self, drive_id: str, path_on_host: str, is_root_device: bool, is_read_only: bool) -> None:
        body = bodies.drive(drive_id, path_on_host, is_root_device, is_read_only)
        await self._call("PUT", f"/drives/{drive_id}", body)

    async def put_network_interface(
        self,
        iface_id: str,
        host_dev_name: str,
        guest_mac: str | None = None,
        rx: RateLimit | None = None,
        tx: RateLimit | None = None,
    ) -> None:
        body = bodies.network_interface(iface_id, host_dev_name, guest_mac, rx, tx)
        await self._call("PUT", f"/network-interfaces/{iface_id}", body)

    # --- actions and runtime --------------------------------------------------------
    async def instance_start(self) -> None:
        await self._call("PUT", "/actions", bodies.action("InstanceStart"))

    async def send_ctrl_alt_del(self) -> None:
        await self._call("PUT", "/actions", bodies.action("SendCtrlAltDel"))

    async def flush_metrics(self) -> None:
        await self._call("PUT", "/actions", bodies.action("FlushMetrics"))

    async def pause(self) -> None:
        await self._call("PATCH", "/vm", bodies.vm_state("Paused"))

    async def resume(self) -> None:
        await self._call("PATCH", "/vm", bodies.vm_state("Resumed"))

    # --- snapshots ------------------------------------------------------------------
    async def create_snapshot(
        self, snapshot_path: str, mem_file_path: str, snapshot_type: snapshot_bodies.SnapshotType = "Full"
    ) -> None:
        """PUT /snapshot/create (post-boot, the VM Paused): state and memory files."""
        body = snapshot_bodies.snapshot_create(snapshot_path, mem_file_path, snapshot_type)
        await self._call("PUT", "/snapshot/create", body)

    async def load_snapshot(
        self,
        snapshot_path: str,
        mem_backend_path: str,
        *,
        resume_vm: bool = False,
        network_overrides: dict[str, str] | None = None,
        clock_realtime: bool = False,
    ) -> None:
        """PUT /snapshot/load on a fresh Firecracker (only logger/metrics configured before):
        memory from a File backend, TAPs overridden per iface_id."""
        body = snapshot_bodies.snapshot_load(
            snapshot_path,
            mem_backend_path,
            resume_vm=resume_vm,
            network_overrides=network_overrides,
            clock_realtime=clock_realtime,
        )
        await self._call("PUT", "/snapshot/load", body)


def _fault(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("fault_message"), str):
        return data["fault_message"]
    text = response.text.strip()
    return f"HTTP {response.status_code}" + (f": {text}" if text else "")
