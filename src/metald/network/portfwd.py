"""Port forwards: parsing the request and allocating host ports.

Request form: ``NetworkInterface.options["port_forwards"]``, a comma-separated
list of ``GUEST_PORT[/tcp|udp]`` (host port chosen by metald) or
``HOST_PORT:GUEST_PORT[/tcp|udp]``; the protocol defaults to tcp. Host ports,
chosen or requested, must lie in ``network_port_range``: a forward DNATs every
connection to that port on every host address, so allowing any port would let
a caller capture e.g. the host's SSH. Host ports are claimed in the store
(UNIQUE per port and protocol), so two VMs never get the same one.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from metald.core.errors import InvalidArgument, ResourceExhausted
from metald.core.models import PortForward
from metald.store.sqlite import AddressTaken, Store

OPTIONS_FIELD = "config.network[0].options"
PORT_FORWARDS_KEY = "port_forwards"
KNOWN_OPTIONS = frozenset({PORT_FORWARDS_KEY})
MAX_FORWARDS = 64
PROTOCOLS = ("tcp", "udp")


@dataclass(frozen=True)
class ForwardRequest:
    guest_port: int
    protocol: str
    host_port: int | None = None  # None: metald picks one


def _port(text: str, field: str, what: str) -> int:
    text = text.strip()
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise InvalidArgument(field, f"{what} {text!r} is not a port number (1-65535)")
    return int(text)


def parse_port_forwards(value: str) -> list[ForwardRequest]:
    """Parse the ``port_forwards`` option; InvalidArgument naming the option."""
    field = f"{OPTIONS_FIELD}.{PORT_FORWARDS_KEY}"
    out: list[ForwardRequest] = []
    seen_host: set[tuple[int, str]] = set()
    for raw in value.split(","):
        item = raw.strip()
        if not item:
            continue
        spec, _, proto = item.partition("/")
        proto = (proto or "tcp").strip().lower()
        if proto not in PROTOCOLS:
            raise InvalidArgument(field, f"{item!r}: protocol must be tcp or udp")
        host: int | None = None
        if ":" in spec:
            host_text, _, guest_text = spec.partition(":")
            host = _port(host_text, field, "host port")
        else:
            guest_text = spec
        guest = _port(guest_text, field, "guest port")
        if host is not None:
            if (host, proto) in seen_host:
                raise InvalidArgument(field, f"host port {host}/{proto} is requested twice")
            seen_host.add((host, proto))
        out.append(ForwardRequest(guest, proto, host))
    if len(out) > MAX_FORWARDS:
        raise InvalidArgument(field, f"at most {MAX_FORWARDS} port forwards per VM")
    return out


def parse_options(options: tuple[tuple[str, str], ...] | dict[str, str]) -> list[ForwardRequest]:
    """Validate NetworkInterface.options; unknown keys are rejected."""
    items = options.items() if isinstance(options, dict) else options
    forwards: list[ForwardRequest] = []
    for key, value in items:
        if key not in KNOWN_OPTIONS:
            raise InvalidArgument(
                f"{OPTIONS_FIELD}.{key}",
                f"unknown option (supported: {', '.join(sorted(KNOWN_OPTIONS))})",
            )
        if key == PORT_FORWARDS_KEY:
            forwards = parse_port_forwards(value)
    return forwards


class PortPool:
    """Host ports from ``low..high``, per protocol, with a next-fit cursor and a
    cache of taken ports (same approach as the IPv4 pool)."""

    def __init__(self, low: int, high: int) -> None:
        self.low, self.high = low, high
        self._used: dict[str, set[int]] = {}
        self._cursor: dict[str, int] = {}
        self._lock = threading.Lock()

    def _taken(self, store: Store, proto: str, reload: bool = False) -> set[int]:
        if reload or proto not in self._used:
            self._used[proto] = set(store.used_ports(proto))
        return self._used[proto]

    def claim(self, store: Store, vm_id: str, req: ForwardRequest) -> PortForward:
        field = f"{OPTIONS_FIELD}.{PORT_FORWARDS_KEY}"
        if req.host_port is not None:
            if not self.low <= req.host_port <= self.high:
                raise InvalidArgument(
                    field,
                    f"host port {req.host_port} is outside the forward range "
                    f"{self.low}-{self.high}",
                )
            try:
                store.claim_port(vm_id, req.host_port, req.protocol, req.guest_port)
            except AddressTaken:
                raise InvalidArgument(
                    field, f"host port {req.host_port}/{req.protocol} is already in use"
                ) from None
            with self._lock:
                self._taken(store, req.protocol).add(req.host_port)
            return PortForward(req.guest_port, req.host_port, req.protocol)
        with self._lock:
            span = self.high - self.low + 1
            for attempt in range(2):
                used = self._taken(store, req.protocol, reload=attempt > 0)
                start = self._cursor.get(req.protocol, self.low)
                for step in range(span):
                    port = self.low + (start - self.low + step) % span
                    if port in used:
                        continue
                    try:
                        store.claim_port(vm_id, port, req.protocol, req.guest_port)
                    except AddressTaken:
                        used.add(port)
                        continue
                    used.add(port)
                    self._cursor[req.protocol] = port + 1 if port < self.high else self.low
                    return PortForward(req.guest_port, port, req.protocol)
            raise ResourceExhausted(
                f"no free host port for forwarding in {self.low}-{self.high}/{req.protocol}"
            )

    def release(self, store: Store, vm_id: str) -> None:
        held = store.ports_of(vm_id)
        store.release_ports(vm_id)
        with self._lock:
            for host_port, proto, _guest in held:
                self._used.get(proto, set()).discard(host_port)


def matches(held: list[PortForward], wanted: list[ForwardRequest]) -> bool:
    """Do the VM's held forwards satisfy the request exactly (for idempotent allocate)?"""
    if len(held) != len(wanted):
        return False
    remaining = list(held)
    # explicit host ports first, so that "any port" requests cannot steal them
    for req in sorted(wanted, key=lambda r: r.host_port is None):
        for pf in remaining:
            if pf.guest_port == req.guest_port and pf.protocol == req.protocol and (
                req.host_port is None or req.host_port == pf.host_port
            ):
                remaining.remove(pf)
                break
        else:
            return False
    return True
