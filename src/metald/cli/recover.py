"""``metald recover adopt``: take orphan VMs back into the store (see :mod:`metald.recovery.adopt`)."""

from __future__ import annotations

import argparse
import json
import sys

from metald.config import Settings
from metald.recovery import adopt as recover
from metald.recovery import orphans
from metald.store.storage import open_store


def adopt(settings: Settings, args: argparse.Namespace) -> int:
    store = open_store(settings.db_path)
    try:
        known = {row.vm_id for row in store.all_vms()}
        found = orphans.scan(settings, known, orphans.store_is_empty(store))
        adopted, refused = recover.adopt(settings, store, found)
    finally:
        store.close()
    if args.json:
        print(json.dumps({"adopted": adopted, "not_adopted": refused}, indent=2))
    else:
        for vm_id in adopted:
            print(f"adopted {vm_id}")
        for vm_id, why in sorted(refused.items()):
            print(f"not adopted {vm_id}: {why}", file=sys.stderr)
        if not found:
            print("no orphan VMs on this host")
        elif adopted:
            print(f"{len(adopted)} VM(s) written to the store; restart metald (systemctl restart metald) to adopt "
                  "their VMMs")
        if refused:
            print("remove what was not adopted with `metald cleanup --force`", file=sys.stderr)
    return 1 if refused else 0
