"""`metald image list|pull|rm`: the local image cache (run on the host, as root).

These work on the cache directory directly, like `metald cleanup`: the cache
is safe to share with a running metald (images appear and leave by rename).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any


def _store() -> Any:
    from metald.cli.main import _settings_or_exit
    from metald.images.store import ImageStore

    return ImageStore(_settings_or_exit())


def _fail(exc: Exception) -> int:
    from metald.core.errors import MetaldError

    if isinstance(exc, MetaldError):
        print(f"error: {exc}", file=sys.stderr)
        return 1
    raise exc


def cmd_list(args: argparse.Namespace) -> int:
    images = [i.to_dict() for i in _store().list()]
    if args.json:
        print(json.dumps(images, indent=2))
        return 0
    print(f"{'DIGEST':<20} {'SIZE':>9} {'LAST USED':<20} {'VMS':>4}  REFERENCES")
    for i in images:
        used = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(i["last_used"]))
        size = f"{i['disk_bytes'] >> 20}M"
        print(f"{i['digest'][7:19]:<20} {size:>9} {used:<20} {len(i['in_use_by']):>4}  {', '.join(i['refs'])}")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    try:
        image = asyncio.run(_store().resolve(args.ref, "image", refresh=True))
    except Exception as exc:
        return _fail(exc)
    print(json.dumps(image.to_dict(), indent=2) if args.json else image.digest)
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    try:
        image = _store().remove(args.ref)
    except Exception as exc:
        return _fail(exc)
    print(f"removed {image.digest}")
    return 0


def add_parser(sub: Any) -> None:
    image = sub.add_parser("image", help="the container image cache (docs/images.md)")
    isub = image.add_subparsers(dest="image_command", required=True)
    p = isub.add_parser("list", help="cached images, their size and the VMs using them")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)
    p = isub.add_parser("pull", help="pull and convert an image (again, for a tag)")
    p.add_argument("ref")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_pull)
    p = isub.add_parser("rm", help="remove a cached image no VM uses")
    p.add_argument("ref", help="a reference or sha256:<digest>")
    p.set_defaults(func=cmd_rm)
