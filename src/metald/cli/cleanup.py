"""``metald cleanup``: the root deployment guide's manual "Cleanup", done safely.

The guide deletes every ``fc-*`` namespace and the bridge. metald instead
removes only what belongs to no VM in its store (namespaces, veths, firewall
elements, jails, cgroups), so a running customer VM is never cut off, and
removes the host setup (bridge, nftables tables) only when no VM remains.

VMs found running (or, with an empty store, present at all) with no record in
the store are *orphans* (:mod:`metald.recovery.orphans`): a lost database must not
cost their guests, so cleanup refuses to touch anything while there are any,
unless ``--force`` says to kill their VMMs and remove them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import time

from metald.config import Settings
from metald.recovery import orphans
from metald.store.sqlite import Store

log = logging.getLogger(__name__)

KILL_WAIT_S = 5.0


def kill_orphan_vmms(found: orphans.Orphans) -> list[str]:
    """SIGKILL the orphans' VMM processes (and their process groups); wait until gone."""
    killed = []
    for vm_id, pids in sorted(found.vmms.items()):
        for pid in pids:
            try:
                if os.getpgid(pid) == pid:
                    os.killpg(pid, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            killed.append(f"process {pid} (VMM of orphan {vm_id})")
    deadline = time.monotonic() + KILL_WAIT_S
    for pids in found.vmms.values():
        for pid in pids:
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                            break
                except OSError:
                    break
                time.sleep(0.02)
    return killed


async def cleanup(settings: Settings, args: argparse.Namespace) -> int:
    store = Store(settings.db_path)
    force = bool(getattr(args, "force", False))
    try:
        known = {row.vm_id for row in store.all_vms()}
        found = orphans.scan(settings, known, orphans.store_is_empty(store))
        report: dict[str, object] = {
            "vms_in_store": len(known), "removed": [], "host_setup_removed": False, "orphans": found.ids,
        }
        removed: list[str] = []
        if found and not force:
            report["refused"] = True
            if args.json:
                print(json.dumps(report, indent=2))
            else:
                print(f"refusing: {found.summary()}", file=sys.stderr)
            return 1
        if args.dry_run:
            report["dry_run"] = True
        else:
            from metald.network.manager import NetworkManager

            if found:
                removed += kill_orphan_vmms(found)
                for vm_id in found.ids:
                    run_dir = settings.run_dir / vm_id
                    if run_dir.is_dir():
                        shutil.rmtree(run_dir, ignore_errors=True)
                        removed.append(f"run dir {run_dir}")
            network = NetworkManager(settings, store)
            removed += await network.sweep_leftovers(known)
            try:
                from metald.jailer.jailer import Jailer

                removed += await Jailer(settings).sweep_leftovers(known)
            except Exception as exc:  # jail leftovers are reported, not fatal
                removed.append(f"jail sweep failed: {exc}")
            if not known:
                await network.teardown_host()
                report["host_setup_removed"] = True
        report["removed"] = removed
    finally:
        store.close()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for item in removed:
            print(f"removed {item}")
        print(f"{report['vms_in_store']} VMs in the store; {len(removed)} leftovers removed")
        if report["host_setup_removed"]:
            print(f"no VM remains: removed bridge {settings.network_bridge} and metald's nftables tables")
    return 0
