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
import ipaddress
import re
from collections.abc import Iterator

NAMESPACE_PREFIX = "fc-"
HOST_VETH_PREFIX = "vh_"
NS_VETH_PREFIX = "vn_"
TAP_PREFIX = "tap_"
# The veth pair joining an extra bridge <bridge>-<n> to the main bridge:
# vbp_<n> is a port of the main bridge, vbs_<n> a port of <bridge>-<n>.
TRUNK_MAIN_PREFIX = "vbp_"
TRUNK_EXTRA_PREFIX = "vbs_"
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


# --- bridges -----------------------------------------------------------------------
#
# A Linux bridge holds at most 1023 ports and does work over all its ports when
# one is added or goes up, so VMs are spread over bridges by address: the VM
# subnet is cut into blocks of ``vms_per_bridge`` addresses; block 0's VMs are
# ports of the main bridge, block n's of ``<bridge>-<n>``, which has no address
# and reaches the main bridge over the veth pair ``vbs_<n>``/``vbp_<n>`` (one
# layer-2 segment: the gateway address, the NAT and the host's routes stay on
# the main bridge).


def bridge_block(ip: str, subnet_first: int, vms_per_bridge: int) -> int:
    """The block of the VM subnet ``ip`` lies in (subnet_first: the subnet's
    network address as an int)."""
    return (int(ipaddress.IPv4Address(ip)) - subnet_first) // vms_per_bridge


def extra_bridge(main: str, block: int) -> str:
    """The bridge of block ``block`` (the main bridge for block 0)."""
    return main if block == 0 else f"{main}-{block}"


def block_of_bridge(main: str, name: str) -> int | None:
    """Inverse of :func:`extra_bridge` for extra bridges (None for any other name)."""
    prefix = main + "-"
    if name.startswith(prefix) and name[len(prefix) :].isdigit():
        return int(name[len(prefix) :])
    return None


def trunk_names(block: int) -> tuple[str, str]:
    """(port on the main bridge, port on bridge ``block``) of the joining veth pair."""
    return f"{TRUNK_MAIN_PREFIX}{block}", f"{TRUNK_EXTRA_PREFIX}{block}"
