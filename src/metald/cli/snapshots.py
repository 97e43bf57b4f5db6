"""Snapshot commands: ``metald vm snapshot ID``, ``metald vm create --from-snapshot``
and ``metald snapshot list|info|rm`` (SnapshotService; ``--json`` prints the
response as Connect JSON)."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

PURPOSES = {0: "-", 1: "snapshot", 2: "hibernation"}


def _client(args: argparse.Namespace) -> Any:
    from metald.gen.metal.vmprovisioner.v1.snapshots_connect import SnapshotServiceClientSync

    return SnapshotServiceClientSync(args.server, timeout_ms=int(args.timeout_ms))


def _spb() -> Any:
    from metald.gen.metal.vmprovisioner.v1 import snapshots_pb2

    return snapshots_pb2


def _print(args: argparse.Namespace, message: Any, table: Callable[[], None]) -> None:
    from google.protobuf import json_format

    if args.json:
        print(json.dumps(json_format.MessageToDict(message), indent=2))
    else:
        table()


def cmd_vm_snapshot(args: argparse.Namespace) -> int:
    spb = _spb()
    with _client(args) as client:
        r = client.snapshot_vm(spb.SnapshotVmRequest(vm_id=args.vm_id, name=args.name or "", stop=args.stop))
    _print(args, r, lambda: print(r.snapshot.snapshot_id))
    return 0


def clone(args: argparse.Namespace) -> tuple[str, int]:
    """``vm create --from-snapshot``: (vm id, wire state)."""
    spb = _spb()
    with _client(args) as client:
        r = client.clone_vm(
            spb.CloneVmRequest(
                snapshot_id=args.from_snapshot, vm_id=args.id or "", customer_id=args.customer or "", boot=args.boot
            )
        )
    return r.vm_id, r.state


def cmd_list(args: argparse.Namespace) -> int:
    spb = _spb()
    with _client(args) as client:
        r = client.list_snapshots(spb.ListSnapshotsRequest(source_vm_id=args.vm or "", page_size=args.page_size))

    def table() -> None:
        print(f"{'SNAPSHOT ID':<22}{'SOURCE VM':<24}{'PURPOSE':<13}{'SIZE':>10}  {'USED BY':<16}CREATED  NAME")
        for s in r.snapshots:
            created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.created_timestamp))
            size = (s.state_size_bytes + s.disk_size_bytes) >> 20
            used = ",".join(s.used_by_vm_ids) or "-"
            print(f"{s.snapshot_id:<22}{s.source_vm_id:<24}{PURPOSES.get(s.purpose, '?'):<13}{size:>7}MiB  "
                  f"{used:<16}{created}  {s.name}")  # fmt: skip

    _print(args, r, table)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    spb = _spb()
    with _client(args) as client:
        r = client.get_snapshot(spb.GetSnapshotRequest(snapshot_id=args.snapshot_id))

    def table() -> None:
        s = r.snapshot
        rows = [
            ("snapshot_id", s.snapshot_id), ("name", s.name), ("source_vm_id", s.source_vm_id),
            ("customer_id", s.customer_id), ("purpose", PURPOSES.get(s.purpose, "?")),
            ("vcpus", s.config.cpu.vcpu_count), ("memory", f"{s.config.memory.size_bytes >> 20} MiB"),
            ("state_size", f"{s.state_size_bytes >> 20} MiB"), ("disk_size", f"{s.disk_size_bytes >> 20} MiB"),
            ("created", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.created_timestamp))),
            ("used_by", ", ".join(s.used_by_vm_ids) or "-"),
        ]  # fmt: skip
        rows += [(f"backend.{k}", v) for k, v in sorted(s.backend_info.items())]
        for key, value in rows:
            print(f"{key:<24}{value}")

    _print(args, r, table)
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    spb = _spb()
    with _client(args) as client:
        r = client.delete_snapshot(spb.DeleteSnapshotRequest(snapshot_id=args.snapshot_id, force=args.force))
    _print(args, r, lambda: print(f"{args.snapshot_id}\tdeleted"))
    return 0


def add_vm_snapshot(vsub: Any) -> None:
    p = vsub.add_parser("snapshot", help="snapshot a RUNNING or PAUSED VM; prints the snapshot id")
    p.add_argument("vm_id")
    p.add_argument("--name")
    p.add_argument("--stop", action="store_true", help="hibernate: the VM is SHUTDOWN, `vm boot` resumes it")
    p.set_defaults(func=cmd_vm_snapshot)


def add_snapshot_commands(sub: Any, server_default: str) -> None:
    snap = sub.add_parser("snapshot", help="snapshots (talk to a running metald)")
    snap.add_argument("--server", default=server_default, help="metald API URL (env METALD_SERVER)")
    snap.add_argument("--json", action="store_true", help="machine-readable output")
    snap.add_argument("--timeout-ms", default=120_000, type=int)
    ssub = snap.add_subparsers(dest="snapshot_command", required=True)
    p = ssub.add_parser("list")
    p.add_argument("--vm", help="only snapshots of this source VM")
    p.add_argument("--page-size", type=int, default=0)
    p.set_defaults(func=cmd_list)
    p = ssub.add_parser("info")
    p.add_argument("snapshot_id")
    p.set_defaults(func=cmd_info)
    p = ssub.add_parser("rm")
    p.add_argument("snapshot_id")
    p.add_argument("--force", action="store_true", help="also while VMs use it")
    p.set_defaults(func=cmd_rm)
