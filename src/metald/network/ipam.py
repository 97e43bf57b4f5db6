"""Static IPv4 addresses and MAC addresses for VMs.

Addresses come from ``network_vm_subnet_ipv4`` minus the network, broadcast
and bridge addresses. The store is the authority: ``Store.claim_ip`` inserts
into a UNIQUE column, so an address is never handed out twice whatever the
concurrency; a lost race (AddressTaken) just moves on to the next address.

To avoid reading every allocation per request, the pool keeps a cache of the
addresses it knows are taken and a next-fit cursor. Finding a free address
skips at most the cached taken addresses (O(allocated) in the worst case, O(1)
typically). The cache can only be pessimistic (an address released by another
process still looks taken), so before reporting exhaustion the pool reloads
it from the store once.
"""

from __future__ import annotations

import ipaddress
import re
import threading

from metald.core.errors import InvalidArgument, ResourceExhausted
from metald.store.sqlite import AddressTaken, Store

_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}([:-])[0-9a-fA-F]{2}(\1[0-9a-fA-F]{2}){4}$")


class Ipv4Pool:
    def __init__(
        self,
        subnet: ipaddress.IPv4Network,
        reserved: set[ipaddress.IPv4Address],
        field: str = "config.network[0].ipv4_config.address",
    ) -> None:
        if subnet.prefixlen > 30:
            raise ValueError(f"VM subnet {subnet} is too small (needs /30 or larger)")
        self.subnet = subnet
        self.field = field
        self._first = int(subnet.network_address) + 1
        self._last = int(subnet.broadcast_address) - 1
        self._reserved = {int(a) for a in reserved if a in subnet}
        self._used: set[int] | None = None
        self._cursor = self._first
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        """How many addresses the pool can hand out in total."""
        return self._last - self._first + 1 - len(self._reserved)

    def _load(self, store: Store) -> set[int]:
        used = {int(ipaddress.IPv4Address(ip)) for ip in store.allocated_ips()}
        self._used = used
        return used

    def validate(self, address: str) -> ipaddress.IPv4Address:
        """Parse a caller-requested address; InvalidArgument if unusable."""
        try:
            ip = ipaddress.IPv4Address(address)
        except ValueError:
            raise InvalidArgument(self.field, f"{address!r} is not an IPv4 address") from None
        if ip not in self.subnet:
            raise InvalidArgument(self.field, f"{ip} is outside the VM subnet {self.subnet}")
        value = int(ip)
        if value < self._first or value > self._last:
            raise InvalidArgument(self.field, f"{ip} is the subnet's network or broadcast address")
        if value in self._reserved:
            raise InvalidArgument(self.field, f"{ip} is reserved (bridge address)")
        return ip

    def allocate(self, store: Store, vm_id: str, requested: str | None = None) -> str:
        """Claim an address for ``vm_id`` (the one it holds already, if any)."""
        held = store.ip_of(vm_id)
        if held is not None:
            if requested and ipaddress.IPv4Address(held) != self.validate(requested):
                raise InvalidArgument(self.field, f"VM {vm_id} already has {held}")
            return held
        if requested:
            ip = self.validate(requested)
            try:
                store.claim_ip(vm_id, str(ip))
            except AddressTaken:
                raise InvalidArgument(self.field, f"{ip} is already in use") from None
            with self._lock:
                if self._used is not None:
                    self._used.add(int(ip))
            return str(ip)
        with self._lock:
            for attempt in range(2):
                used = self._used if self._used is not None and attempt == 0 else self._load(store)
                free = self._claim_free(store, vm_id, used)
                if free is not None:
                    return free
            raise ResourceExhausted(
                f"IPv4 pool {self.subnet} is exhausted ({len(used)} addresses in use)"
            )

    def _claim_free(self, store: Store, vm_id: str, used: set[int]) -> str | None:
        span = self._last - self._first + 1
        start = self._cursor
        for step in range(span):
            value = self._first + (start - self._first + step) % span
            if value in used or value in self._reserved:
                continue
            address = str(ipaddress.IPv4Address(value))
            try:
                store.claim_ip(vm_id, address)
            except AddressTaken:
                used.add(value)  # taken behind our back: remember and go on
                continue
            used.add(value)
            self._cursor = value + 1 if value < self._last else self._first
            return address
        return None

    def release(self, store: Store, vm_id: str) -> None:
        held = store.ip_of(vm_id)
        store.release_ip(vm_id)
        if held is not None:
            with self._lock:
                if self._used is not None:
                    self._used.discard(int(ipaddress.IPv4Address(held)))


def normalize_mac(value: str, field: str = "config.network[0].mac_address") -> str:
    """A caller's MAC as lower-case ``aa:bb:..``; InvalidArgument unless unicast."""
    if not _MAC_RE.match(value):
        raise InvalidArgument(field, f"{value!r} is not a MAC address (aa:bb:cc:dd:ee:ff)")
    mac = value.lower().replace("-", ":")
    first = int(mac[:2], 16)
    if first & 1:
        raise InvalidArgument(field, f"{mac} is a multicast/broadcast address")
    if mac == "00:00:00:00:00:00":
        raise InvalidArgument(field, "the all-zero MAC is not usable")
    return mac
