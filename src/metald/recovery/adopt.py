"""``metald recover adopt``: write orphan VMs back into the store from what the host shows.

For each orphan (:mod:`metald.recovery.orphans`) whose VMM is a running QEMU of
this metald, the record is rebuilt from the VMM's own command line (vCPUs,
memory, kernel, initrd, kernel arguments, drives, MAC, TAP, console, QMP
socket) and the VM's namespace (the ``ip=`` argument and the host veth's
bridge), with its VMM handle (pid, start time, command-line hash). The VM is
written RUNNING with an event ``recover adopted``; the next start of metald
adopts its VMM on that identity as after any restart, and records PAUSED if
the VMM is paused. Customer id, metadata and port forwards are not visible on
the host: adopted VMs belong to the operator (customer ``""``) with no port
forwards; the operator may re-create forwards by re-creating the VM.
Orphans without a running QEMU (only a namespace or jail left) are not
adopted: ``metald cleanup --force`` removes them.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass
from pathlib import Path

from metald.backends import procfs
from metald.backends.qemu.clock import ARG as TSC_ARG
from metald.backends.qemu.command import argv_hash, qmp_socket_path
from metald.backends.qemu.handle import VmmHandle
from metald.config import Settings
from metald.core.models import Drive, NetworkAllocation, NicRequest, VmDraft, VmState
from metald.core.specs import draft_to_dict
from metald.gen.metal.vmprovisioner.v1 import vm_pb2 as pb
from metald.network import names
from metald.recovery.orphans import Orphans
from metald.store.sqlite import Store


class NotAdoptable(Exception):
    """Why one orphan cannot be written back (one line)."""


@dataclass(frozen=True)
class Recovered:
    vm_id: str
    draft: VmDraft
    handle: VmmHandle
    network: NetworkAllocation | None


def _opts(value: str) -> dict[str, str]:
    """QEMU ``k=v,k2=v2`` (doubled commas are literal commas)."""
    out: dict[str, str] = {}
    for part in value.replace(",,", "\0").split(","):
        key, _, val = part.partition("=")
        out[key] = val.replace("\0", ",")
    return out


def _args(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def _one(argv: list[str], flag: str) -> str | None:
    found = _args(argv, flag)
    return found[0] if found else None


def parse_qemu(vm_id: str, argv: list[str]) -> tuple[VmDraft, str, str | None, str | None, str | None]:
    """(draft, accel, tap, mac, ip= argument) from a QEMU command line built by metald."""
    smp, mem, kernel = _one(argv, "-smp"), _one(argv, "-m"), _one(argv, "-kernel")
    if smp is None or mem is None or kernel is None:
        raise NotAdoptable("the VMM's command line lacks -smp, -m or -kernel")
    words = (_one(argv, "-append") or "").split()
    ip_arg = next((w for w in words if w.startswith("ip=")), None)
    kept = [w for w in words if not w.startswith(("metald.vm_id=", "ip=", TSC_ARG + "="))]
    serials = [_opts(d).get("serial", "") for d in _args(argv, "-device") if d.startswith("virtio-blk-device")]
    drives = []
    for index, spec in enumerate(_args(argv, "-drive")):
        opts = _opts(spec)
        drive_id = serials[index] if index < len(serials) and serials[index] else f"drive{index}"
        drives.append(Drive(drive_id, Path(opts["file"]), opts.get("readonly") == "on", index == 0))
    tap = next((_opts(n).get("ifname") for n in _args(argv, "-netdev") if n.startswith("tap")), None)
    mac = next((_opts(d).get("mac") for d in _args(argv, "-device") if d.startswith("virtio-net-device")), None)
    draft = VmDraft(
        vcpu_count=int(smp),
        memory_bytes=int(mem) << 20,
        kernel_path=Path(kernel),
        initrd_path=Path(initrd) if (initrd := _one(argv, "-initrd")) else None,
        kernel_args=" ".join(kept),
        drives=tuple(drives),
        nic=NicRequest(mac=mac, tap=None, ipv4=None, rx_rate_limit=None, tx_rate_limit=None, options=())
        if tap
        else None,
        console_enabled=any(c.startswith("file,") for c in _args(argv, "-chardev")),
        metadata=(),
    )
    return draft, (_one(argv, "-accel") or "tcg").split(",")[0], tap, mac, ip_arg


def _network(settings: Settings, vm_id: str, tap: str, mac: str | None, ip_arg: str | None) -> NetworkAllocation:
    short = tap.removeprefix("tap_")
    if not names.is_short_id(short) or not ip_arg:
        raise NotAdoptable(f"cannot read the VM's network from TAP {tap!r} and {ip_arg!r}")
    fields = ip_arg.removeprefix("ip=").split(":")
    if len(fields) < 4:
        raise NotAdoptable(f"cannot read the VM's address from {ip_arg!r}")
    ip, gateway, mask = fields[0], fields[2], fields[3]
    prefix = ipaddress.ip_network(f"0.0.0.0/{mask}").prefixlen
    dns = tuple(f for f in fields[7:9] if f)
    host_veth = names.host_veth_name(short)
    master = Path(f"/sys/class/net/{host_veth}/master")
    bridge = master.resolve().name if master.exists() else ""
    return NetworkAllocation(
        short_id=short,
        namespace=names.namespace_name(vm_id),
        host_veth=host_veth,
        ns_veth=names.ns_veth_name(short),
        tap=tap,
        ip=ip,
        prefix_len=prefix,
        gateway=gateway,
        mac=mac or "",
        dns_servers=dns,
        bridge="" if bridge == settings.network_bridge else bridge,
    )


def inspect(settings: Settings, vm_id: str, pids: list[int]) -> Recovered:
    """What the host shows of one orphan's QEMU; NotAdoptable if it is not one."""
    sock = str(qmp_socket_path(settings.run_dir / vm_id))
    for pid in pids:
        argv = procfs.read_cmdline(pid) or []
        stat = procfs.read_stat(pid)
        if stat is None or not argv or "qemu" not in Path(argv[0]).name:
            continue
        if not any(sock in a for a in argv):
            continue
        draft, accel, tap, mac, ip_arg = parse_qemu(vm_id, argv)
        network = None
        if tap is not None and settings.network_enabled:
            network = _network(settings, vm_id, tap, mac, ip_arg)
        handle = VmmHandle(pid=pid, start_time=stat.start_time, qmp_socket=sock, accel=accel,
                           argv_hash=argv_hash(argv))
        return Recovered(vm_id, draft, handle, network)
    raise NotAdoptable(f"no running QEMU of this metald for {vm_id} (pids {pids})")


def config_of(draft: VmDraft, network: NetworkAllocation | None) -> bytes:
    """The VmConfig a caller would have sent for this draft (as GetVmInfo shows it)."""
    config = pb.VmConfig(
        cpu=pb.CpuConfig(vcpu_count=draft.vcpu_count),
        memory=pb.MemoryConfig(size_bytes=draft.memory_bytes),
        boot=pb.BootConfig(
            kernel_path=str(draft.kernel_path),
            initrd_path=str(draft.initrd_path or ""),
            kernel_args=draft.kernel_args,
        ),
        console=pb.ConsoleConfig(enabled=draft.console_enabled),
    )
    for d in draft.drives:
        config.storage.append(pb.StorageDevice(id=d.drive_id, path=str(d.path), read_only=d.read_only,
                                               is_root_device=d.is_root))
    if network is not None:
        config.network.append(pb.NetworkInterface(id="eth0", mac_address=network.mac))
    return config.SerializeToString(deterministic=True)


def adopt(settings: Settings, store: Store, found: Orphans) -> tuple[list[str], dict[str, str]]:
    """Write every adoptable orphan into the store; (adopted ids, vm_id -> why not)."""
    from metald.network.allocation import allocation_to_dict

    adopted: list[str] = []
    refused: dict[str, str] = {}
    for vm_id in found.ids:
        try:
            rec = inspect(settings, vm_id, found.vmms.get(vm_id, []))
        except NotAdoptable as exc:
            refused[vm_id] = str(exc)
            continue
        network = allocation_to_dict(rec.network) if rec.network is not None else None
        store.insert_vm(vm_id, "", int(VmState.RUNNING), config_of(rec.draft, rec.network), draft_to_dict(rec.draft),
                        "qemu", rec.draft.vcpu_count, rec.draft.memory_bytes, {}, network=network)
        if rec.network is not None:
            store.claim_short_id(vm_id, rec.network.short_id)
            store.claim_ip(vm_id, rec.network.ip)
        store.update_vm(vm_id, handle=rec.handle.to_dict(), status={"booted_at": time.time(), "recovered": True})
        store.add_event(vm_id, "recover", "adopted", f"from running QEMU pid {rec.handle.pid}")
        adopted.append(vm_id)
    return adopted, refused
