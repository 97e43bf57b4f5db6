"""``metald cleanup``: the root deployment guide's manual "Cleanup", done safely.

The guide deletes every ``fc-*`` namespace and the bridge. metald instead
removes only what belongs to no VM in its store (namespaces, veths, firewall
elements, jails, cgroups), so a running customer VM is never cut off, and
removes the host setup (bridge, nftables tables) only when no VM remains.
"""

from __future__ import annotations

import argparse
import json
import logging

from metald.config import Settings
from metald.store.sqlite import Store

log = logging.getLogger(__name__)


async def cleanup(settings: Settings, args: argparse.Namespace) -> int:
    store = Store(settings.db_path)
    try:
        known = {row.vm_id for row in store.all_vms()}
        report: dict[str, object] = {"vms_in_store": len(known), "removed": [], "host_setup_removed": False}
        removed: list[str] = []
        if args.dry_run:
            report["dry_run"] = True
        else:
            from metald.network.manager import NetworkManager

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
