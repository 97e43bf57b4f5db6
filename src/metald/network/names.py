"""Deterministic names and MAC addresses derived from a VM id.

A VM's *short id* is the first 8 hex characters of ``sha256(vm_id)``. Device
names are built from it because Linux limits interface names to 15 bytes:
``vh_<short>`` (host veth), ``vn_<short>`` (namespace veth) and
``tap_<short>`` (TAP) are 11 and 12 bytes. The namespace is ``fc-<vm-id>``:
a namespace name is a file name under /run/netns, so the full id fits.

Collisions: two VM ids can share a short id (32 bits: about 1% chance at 10,000
VMs). Short ids are claimed in the store (unique column); when candidate 0 is
held by another VM, candidate ``k`` (k = 1, 2, ...) is the first 8 hex
characters of ``sha256(f"{vm_id}#{k}")``. The chosen short id is persisted with
the allocation, so the names never depend on allocation order afterwards.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterator

NAMESPACE_PREFIX = "fc-"
HOST_VETH_PREFIX = "vh_"
NS_VETH_PREFIX = "vn_"
TAP_PREFIX = "tap_"
IFNAMSIZ = 15  # usable bytes of a Linux interface name
MAX_VM_ID_LEN = 64
MAX_SHORT_ID_CANDIDATES = 16

_VM_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$")
_SHORT_RE = re.compile(r"^[0-9a-f]{8}$")


def valid_vm_id(vm_id: str) -> bool:
    """Letters, digits and hyphens, at most 64 characters, not starting with '-'."""
    return bool(_VM_ID_RE.match(vm_id))


def short_id_candidates(vm_id: str) -> Iterator[str]:
    """Short ids to try in order (see the module docstring)."""
    yield hashlib.sha256(vm_id.encode()).hexdigest()[:8]
    for k in range(1, MAX_SHORT_ID_CANDIDATES):
        yield hashlib.sha256(f"{vm_id}#{k}".encode()).hexdigest()[:8]


def short_id(vm_id: str) -> str:
    """Candidate 0: the short id a VM gets unless another VM already holds it."""
    return next(short_id_candidates(vm_id))


def is_short_id(value: str) -> bool:
    return bool(_SHORT_RE.match(value))


def namespace_name(vm_id: str) -> str:
    return NAMESPACE_PREFIX + vm_id


def vm_id_of_namespace(name: str) -> str | None:
    """The VM id a ``fc-<vm-id>`` namespace belongs to, or None for other names."""
    if not name.startswith(NAMESPACE_PREFIX):
        return None
    vm_id = name[len(NAMESPACE_PREFIX) :]
    return vm_id if valid_vm_id(vm_id) else None


def host_veth_name(short: str) -> str:
    return HOST_VETH_PREFIX + short


def ns_veth_name(short: str) -> str:
    return NS_VETH_PREFIX + short


def tap_name(short: str) -> str:
    return TAP_PREFIX + short


def short_of_host_veth(ifname: str) -> str | None:
    if ifname.startswith(HOST_VETH_PREFIX):
        rest = ifname[len(HOST_VETH_PREFIX) :]
        return rest if is_short_id(rest) else None
    return None


def _mac(first: int, rest: bytes) -> str:
    return ":".join(f"{b:02x}" for b in bytes([first]) + rest[:5])


def guest_mac(vm_id: str) -> str:
    """Default guest MAC: 02 (locally administered, unicast) + 5 bytes of sha256(vm_id).

    The guest is alone on its TAP, so this need not be unique across VMs.
    """
    return _mac(0x02, hashlib.sha256(vm_id.encode()).digest())


@functools.lru_cache(maxsize=4096)
def ns_veth_mac(short: str) -> str:
    """MAC of ``vn_<short>``: 0a:<short id bytes>:01. Unique on the bridge
    because short ids are unique (the guest's own MAC never reaches the bridge:
    the namespace routes)."""
    return _mac(0x0A, bytes.fromhex(short) + b"\x01")


@functools.lru_cache(maxsize=16)
def bridge_mac(bridge: str) -> str:
    """Fixed bridge MAC, so the gateway MAC does not change as ports come and go."""
    return _mac(0x02, hashlib.sha256(f"metald-bridge:{bridge}".encode()).digest())
