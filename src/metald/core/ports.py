"""The ports of the core: what it needs from backends, the network and storage.

The core imports only these; the adapters (``metald.backends``,
``metald.network``, ``metald.store``) implement them and the daemon (the
composition root) plugs them in. A backend is the union of three small
contracts every backend keeps (:class:`VmmLifecycle`, :class:`VmmRecovery`,
:class:`JailKeeper`) plus optional abilities it declares through
:meth:`Backend.identity_adopter`, read once when the engine is built.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from metald.core.models import BootSpec, Drive, NetworkAllocation, NicRequest, VmMetrics
from metald.core.plan import Step
from metald.core.records import Intent, SnapshotRecord, VmRecord

# Called by a backend when a VMM exits on its own: (vm_id, reason).
ExitCallback = Callable[[str, str], None]

@dataclass(frozen=True)
class BackendLimits:
    """The largest VM a backend runs on this host (the API validates against these)."""

    max_vcpus: int


# A VMM's own run state, as far as the engine cares ("other": starting, stopped, an error state).
RunState = Literal["running", "paused", "other"]


class VmmLifecycle(Protocol):
    """Starting, driving and stopping one VMM per VM.

    ``handle`` values are JSON-serialisable dicts the backend returns from
    ``boot`` and gets back in ``adopt``; the store keeps them so a restarted
    metald can find its VMMs again.
    """

    name: str

    def set_exit_callback(self, callback: ExitCallback) -> None: ...

    async def ping(self) -> tuple[bool, str]:
        """Is the backend usable on this host? (ok, detail)"""
        ...

    def limits(self) -> BackendLimits:
        """What this backend can run on this host (published once for the API)."""
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
        """Kill any VMM left for the VM and remove the backend's files and jail."""
        ...

    def is_running(self, vm_id: str) -> bool: ...

    async def info(self, vm_id: str) -> dict[str, str]: ...

    async def metrics(self, vm_id: str) -> VmMetrics: ...

    async def close(self) -> None:
        """Detach from all VMMs (without stopping them)."""
        ...


class VmmRecovery(Protocol):
    """What reconciliation and rollbacks ask of a backend."""

    async def vmm_status(self, vm_id: str) -> RunState:
        """The adopted VMM's own run state (settles an interrupted pause/resume)."""
        ...

    async def discard(self, vm_id: str, kill_strays: bool = True) -> list[int]:
        """Kill every VMM process of the VM and remove its runtime files (logs and
        jail stay); return the pids of untracked ones killed. ``kill_strays=False``
        skips the search for those."""
        ...

    def adopt_error(self, vm_id: str) -> str | None:
        """Why the last adoption of this VM failed (None: it did not, or unknown)."""
        ...

    async def sweep_leftovers(self, known_vm_ids: set[str]) -> list[str]:
        """Remove stray VMMs and jails of VMs metald does not know; say what went."""
        ...

    def run_dir_entries(self) -> frozenset[str]:
        """Entries of the run directory the backend keeps for itself (not a VM's)."""
        ...


class JailKeeper(Protocol):
    """The VM's jail, which it keeps while SHUTDOWN (with the VMM's logs)."""

    @property
    def tap_owner(self) -> tuple[int, int] | None:
        """uid/gid the VM's TAP must belong to (a jailed VMM opens it without root)."""
        ...

    def jail_exists(self, vm_id: str) -> bool: ...

    async def remove_jail(self, vm_id: str) -> None:
        """Remove the jail (killing what is left in its cgroup); idempotent."""
        ...

    async def restore_jail(self, spec: BootSpec) -> None:
        """Make the jail again (the undo of ``remove_jail`` in a failed delete)."""
        ...


class IdentityAdopter(Protocol):
    """Optional: adopt many VMMs at start-up on their identity alone (one batch of
    /proc checks), and connect each one's control socket later."""

    async def adopt_many(self, items: list[tuple[BootSpec, dict[str, Any]]]) -> set[str]: ...

    async def attach(self, vm_id: str) -> bool:
        """Connect the control socket of a VMM adopted by ``adopt_many``; False if
        it does not answer (``adopt_error`` says why)."""
        ...


class WarmUp(Protocol):
    """Optional: work a backend starts in the background once metald is up
    (QEMU's KVM probe: VMs boot under TCG until it answers)."""

    async def warm_up(self) -> None:
        """Start the work and return at once."""
        ...


@dataclass(frozen=True)
class SavedSnapshot:
    """What a backend wrote into a snapshot directory (every file durable)."""

    manifest: dict[str, Any]
    state_bytes: int  # memory and device state, as stored
    disk_bytes: int  # the drive copies
    stopped_s: float  # how long the guest did not run


class Snapshotter(Protocol):
    """Optional: save a guest (memory, devices, disks) and start VMs from it.

    Offered by ``Backend.snapshotter()`` (read once); without it the snapshot
    RPCs answer ``unimplemented`` naming the backend.
    """

    async def save(self, spec: BootSpec, directory: Path, stop: bool) -> SavedSnapshot:
        """Write the snapshot into ``directory`` (created here). ``stop``: the VMM
        quits once the files are durable. On failure the directory is gone and
        the guest is as it was."""
        ...

    def check_restorable(self, directory: Path, spec: BootSpec) -> None:
        """Raise InvalidArgument (naming the field) or FailedPrecondition if
        ``spec`` cannot start from the snapshot."""
        ...

    def clone_drives(self, directory: Path, dest: Path) -> tuple[Drive, ...]:
        """Copy-on-write drives in ``dest`` backed by the snapshot's disk copies."""
        ...

    async def restore(self, spec: BootSpec, directory: Path, *, clone: bool) -> dict[str, Any]:
        """Start the VM's VMM from the snapshot; returns its handle. ``clone``: the
        guest takes the spec's identity (id, hostname, address) and confirms it;
        else (a hibernated VM resuming) it gets a clock and a seed. On failure
        no VMM is left."""
        ...

    async def boot_clone(self, spec: BootSpec) -> dict[str, Any]:
        """Cold-boot a clone whose drives come from :meth:`clone_drives`."""
        ...


class Backend(VmmLifecycle, VmmRecovery, JailKeeper, Protocol):
    """A VMM backend (QEMU, Firecracker): every contract above, plus its options."""

    def identity_adopter(self) -> IdentityAdopter | None:
        """The batched adoption this backend offers, if any (read once)."""
        ...

    def warmer(self) -> WarmUp | None:
        """The background warm-up this backend needs after start, if any (None: nothing to do)."""
        ...

    def snapshotter(self) -> Snapshotter | None:
        """Snapshots of this backend's guests, if it can take them (read once)."""
        ...


class Network(Protocol):
    """Per-VM networks and the host setup (implemented by metald.network).

    The network owns its resources: it re-applies its own steps (``reapply_steps``)
    and gives back what it released when a delete is undone (``release_step``).
    """

    async def setup_host(self) -> None: ...

    async def teardown_host(self) -> None: ...

    async def check(self) -> tuple[bool, str]: ...

    async def allocate(self, vm_id: str, nic: NicRequest | None) -> NetworkAllocation:
        """Claim the VM's address, host ports and device names (idempotent per VM)."""
        ...

    async def release(self, vm_id: str) -> None: ...

    def release_step(self, vm_id: str) -> Step:
        """A step releasing the VM's claims whose undo claims exactly them again."""
        ...

    def setup_steps(
        self, alloc: NetworkAllocation, owner_uid: int | None = None, owner_gid: int | None = None
    ) -> list[Step]:
        """The steps making the VM's network (each undone if a later one fails)."""
        ...

    def reapply_steps(
        self, alloc: NetworkAllocation, owner_uid: int | None = None, owner_gid: int | None = None
    ) -> list[Step]:
        """The steps making an existing VM network whole again: missing parts are
        made, present ones left alone, and nothing the VM had is undone."""
        ...

    async def teardown(self, alloc: NetworkAllocation) -> None: ...

    async def settle(self, timeout: float) -> bool:
        """Wait until the devices of torn-down VMs are gone (False: timed out)."""
        ...

    async def sweep_leftovers(self, known_vm_ids: set[str]) -> list[str]: ...

    def kernel_ip_arg(self, alloc: NetworkAllocation) -> str: ...

    async def tap_counters(self, alloc: NetworkAllocation) -> tuple[int, int, int, int]: ...

    def allocation_to_dict(self, alloc: NetworkAllocation) -> dict[str, Any]: ...

    def allocation_from_dict(self, data: dict[str, Any]) -> NetworkAllocation: ...


class Repository(Protocol):
    """Durable state (implemented by metald.store): VM records, intents, events."""

    def insert_vm(
        self,
        vm_id: str,
        customer_id: str,
        state: int,
        config: bytes,
        spec: dict[str, Any],
        backend: str,
        vcpu_count: int,
        memory_bytes: int,
        metadata: dict[str, str],
        network: dict[str, Any] | None = None,
    ) -> VmRecord:
        """Raises DuplicateVm if the id is taken."""
        ...

    def get_vm(self, vm_id: str) -> VmRecord | None: ...

    def update_vm(self, vm_id: str, **fields: Any) -> None: ...

    def delete_vm(self, vm_id: str) -> None:
        """Forget the VM with its address claims and intent."""
        ...

    def list_vms(
        self,
        states: Sequence[int] = (),
        after_seq: int = 0,
        limit: int = 100,
        customer_id: str | None = None,
    ) -> tuple[list[VmRecord], int]: ...

    def all_vms(self) -> list[VmRecord]: ...

    def active_memory_bytes(self) -> int: ...

    def add_event(
        self,
        vm_id: str,
        operation: str,
        outcome: str,
        detail: str = "",
        *,
        code: str = "",
        customer_id: str | None = None,
    ) -> None:
        """Append an event (``code``: a failure's error code; ``customer_id``:
        the owner, for an event before the VM's row exists)."""
        ...

    def begin_intent(self, vm_id: str, operation: str, detail: dict[str, Any] | None = None) -> None: ...

    def end_intent(self, vm_id: str) -> None: ...

    def intents(self) -> list[Intent]: ...


class Orphans(Protocol):
    """VMs found running on this host with no record in the store."""

    @property
    def ids(self) -> list[str]: ...

    def __bool__(self) -> bool: ...

    def summary(self) -> str:
        """One line for the log: how many, which, what to do."""
        ...


class OrphanScan(Protocol):
    """Finds orphans given the VM ids the store knows (blocking: run in a thread).

    Implemented by ``metald.recovery.orphans``; with orphans present reconcile
    sweeps nothing. Without a scan (unit tests) the sweep always runs."""

    def __call__(self, known: set[str]) -> Orphans: ...


class SnapshotStore(Protocol):
    """Snapshot rows and their directories (implemented by metald.store.snapshots).

    A row is pending from :meth:`begin` until :meth:`complete`; only complete
    rows are returned; pending ones are removed at start (``sweep``).
    """

    def begin(
        self,
        snapshot_id: str,
        *,
        name: str,
        source_vm_id: str,
        customer_id: str,
        config: bytes,
        spec: dict[str, Any],
        purpose: Literal["snapshot", "hibernation"] = "snapshot",
    ) -> Path:
        """Record a pending snapshot; return the directory to write (not created)."""
        ...

    def complete(
        self, snapshot_id: str, manifest: dict[str, Any], state_bytes: int, disk_bytes: int
    ) -> SnapshotRecord: ...

    def abort(self, snapshot_id: str) -> None:
        """Forget a pending snapshot and its directory (the undo of ``begin``)."""
        ...

    def directory(self, snapshot_id: str) -> Path: ...

    def get(self, snapshot_id: str, customer_id: str | None = None) -> SnapshotRecord:
        """A complete snapshot; NotFound for pending ones and other customers'."""
        ...

    def list_snapshots(
        self, customer_id: str | None = None, source_vm_id: str | None = None, after_seq: int = 0, limit: int = 1000
    ) -> list[SnapshotRecord]: ...

    def add_user(self, vm_id: str, snapshot_id: str) -> None: ...

    def remove_user(self, vm_id: str) -> None: ...

    def users(self, snapshot_id: str) -> list[str]: ...

    def delete(self, snapshot_id: str, customer_id: str | None = None, force: bool = False) -> None:
        """FailedPrecondition while in use, unless ``force``."""
        ...

    def close(self) -> None: ...
