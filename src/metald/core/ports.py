"""Interfaces the core needs from the outside world (backends, network, jailer).

The core only imports these; adapters under ``metald.backends`` and
``metald.network`` implement them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from metald.core.models import BootSpec, VmMetrics

# Called by a backend when a VMM exits on its own: (vm_id, reason).
ExitCallback = Callable[[str, str], None]


class Backend(Protocol):
    """One kind of VMM (QEMU, Firecracker).

    ``handle`` values are JSON-serialisable dicts the backend returns from
    ``boot`` and gets back in ``adopt``; the store keeps them so a restarted
    metald can find its VMMs again.
    """

    name: str

    def set_exit_callback(self, callback: ExitCallback) -> None: ...

    async def ping(self) -> tuple[bool, str]:
        """Is the backend usable on this host? (ok, detail)"""
        ...

    async def validate(self, spec: BootSpec) -> None:
        """Raise InvalidArgument if the spec cannot run on this backend."""
        ...

    async def boot(self, spec: BootSpec) -> dict[str, Any]:
        """Start the VMM and the guest; return the handle to persist."""
        ...

    async def adopt(self, spec: BootSpec, handle: dict[str, Any]) -> bool:
        """Re-attach to a running VMM after a restart; False if it is gone."""
        ...

    async def pause(self, vm_id: str) -> None: ...

    async def resume(self, vm_id: str) -> None: ...

    async def shutdown(self, vm_id: str, force: bool, timeout_s: float) -> str:
        """Stop the VMM; return how it ended (e.g. "guest poweroff", "killed")."""
        ...

    async def reboot(self, spec: BootSpec, force: bool) -> dict[str, Any]:
        """Reboot the guest; return the (possibly new) handle."""
        ...

    async def cleanup(self, vm_id: str) -> None:
        """Kill any VMM left for the VM and remove the backend's files."""
        ...

    def is_running(self, vm_id: str) -> bool: ...

    async def info(self, vm_id: str) -> dict[str, str]: ...

    async def metrics(self, vm_id: str) -> VmMetrics: ...

    async def close(self) -> None:
        """Detach from all VMMs (without stopping them)."""
        ...


class Network(Protocol):
    """Per-VM networks and the host setup (implemented by metald.network)."""

    async def setup_host(self) -> None: ...

    async def teardown_host(self) -> None: ...

    async def allocate(self, vm_id: str, nic: Any) -> Any: ...

    async def release(self, vm_id: str) -> None: ...

    def setup_steps(
        self, alloc: Any, owner_uid: int | None = None, owner_gid: int | None = None
    ) -> list[Any]: ...

    async def teardown(self, alloc: Any) -> None: ...

    async def sweep_leftovers(self, known_vm_ids: set[str]) -> list[str]: ...

    async def check(self) -> tuple[bool, str]: ...

    def kernel_ip_arg(self, alloc: Any) -> str: ...

    async def tap_counters(self, alloc: Any) -> tuple[int, int, int, int]: ...

    def allocation_to_dict(self, alloc: Any) -> dict[str, Any]: ...

    def allocation_from_dict(self, data: dict[str, Any]) -> Any: ...
