"""A stand-in for a guest: the test process attaches to a VM's TAP and answers
like a minimal IPv4 stack (ARP, ICMP echo, UDP echo, TCP SYN -> SYN-ACK).

Lets the network tests send real traffic through the namespace, the bridge
and the nft rules without booting a VM. Also holds the self-test of that
helper.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import select
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from metald.network import netns

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def mac_str(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def ip_packet(src: str, dst: str, proto: int, payload: bytes, ttl: int = 64) -> bytes:
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0x1234, 0x4000, ttl, proto, 0,
        socket.inet_aton(src), socket.inet_aton(dst),
    )
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + payload


def udp_segment(sport: int, dport: int, data: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data


def tcp_segment(src: str, dst: str, sport: int, dport: int, seq: int, ack: int, flags: int) -> bytes:
    head = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 64240, 0, 0)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(head))
    csum = checksum(pseudo + head)
    return head[:16] + struct.pack("!H", csum) + head[18:]


def icmp_echo(kind: int, ident: int, seq: int, data: bytes = b"metald") -> bytes:
    body = struct.pack("!BBHHH", kind, 0, 0, ident, seq) + data
    return body[:2] + struct.pack("!H", checksum(body)) + body[4:]


@dataclass
class Frame:
    dst_mac: str
    src_mac: str
    ethertype: int
    payload: bytes

    @property
    def ip(self) -> tuple[str, str, int, bytes] | None:
        """(src, dst, proto, l4 payload) of an IPv4 frame."""
        if self.ethertype != ETH_P_IP or len(self.payload) < 20:
            return None
        ihl = (self.payload[0] & 0xF) * 4
        proto = self.payload[9]
        src = socket.inet_ntoa(self.payload[12:16])
        dst = socket.inet_ntoa(self.payload[16:20])
        total = struct.unpack("!H", self.payload[2:4])[0]
        return src, dst, proto, self.payload[ihl:total]


class FakeGuest:
    def __init__(self, namespace: str, tap: str, mac: str, ip: str, gateway: str) -> None:
        self.namespace, self.tap, self.mac, self.ip, self.gateway = namespace, tap, mac, ip, gateway
        self.received: list[Frame] = []
        self.gateway_mac: str | None = None
        self._stop = threading.Event()
        self._fd = -1
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # --- lifecycle ---------------------------------------------------------------
    def start(self) -> FakeGuest:
        with netns.entered(self.namespace):
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", self.tap.encode(), IFF_TAP | IFF_NO_PI))
        self._fd = fd
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> FakeGuest:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- sending -----------------------------------------------------------------
    def send_frame(self, dst_mac: str, ethertype: int, payload: bytes, src_mac: str | None = None) -> None:
        frame = mac_bytes(dst_mac) + mac_bytes(src_mac or self.mac) + struct.pack("!H", ethertype)
        os.write(self._fd, frame + payload)

    def resolve_gateway(self, timeout: float = 3.0) -> str:
        """ARP for the gateway (answered by proxy ARP on the TAP)."""
        arp = struct.pack("!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, 1, mac_bytes(self.mac),
                          socket.inet_aton(self.ip), b"\0" * 6, socket.inet_aton(self.gateway))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.gateway_mac is None:
            self.send_frame("ff:ff:ff:ff:ff:ff", ETH_P_ARP, arp)
            time.sleep(0.05)
        assert self.gateway_mac is not None, "no proxy-ARP answer for the gateway"
        return self.gateway_mac

    def send_ip(self, dst: str, proto: int, l4: bytes, src: str | None = None) -> None:
        gw = self.gateway_mac or self.resolve_gateway()
        self.send_frame(gw, ETH_P_IP, ip_packet(src or self.ip, dst, proto, l4))

    def send_udp(self, dst: str, sport: int, dport: int, data: bytes, src: str | None = None) -> None:
        self.send_ip(dst, 17, udp_segment(sport, dport, data), src)

    def send_ping(self, dst: str, ident: int = 7, seq: int = 1) -> None:
        self.send_ip(dst, 1, icmp_echo(8, ident, seq))

    def wait_for(self, pred: Callable[[Frame], bool], timeout: float = 3.0) -> Frame | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for f in self.received:
                    if pred(f):
                        return f
            time.sleep(0.02)
        return None

    # --- answering ---------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._fd], [], [], 0.1)
            if not ready:
                continue
            try:
                raw = os.read(self._fd, 65536)
            except OSError:
                return
            if len(raw) < 14:
                continue
            frame = Frame(mac_str(raw[0:6]), mac_str(raw[6:12]),
                          struct.unpack("!H", raw[12:14])[0], raw[14:])
            with self._lock:
                self.received.append(frame)
            try:
                self._answer(frame)
            except OSError:
                return

    def _answer(self, f: Frame) -> None:
        if f.ethertype == ETH_P_ARP and len(f.payload) >= 28:
            op = struct.unpack("!H", f.payload[6:8])[0]
            sha, spa, tpa = f.payload[8:14], f.payload[14:18], f.payload[24:28]
            if op == 2 and socket.inet_ntoa(spa) == self.gateway:
                self.gateway_mac = mac_str(sha)
            elif op == 1 and socket.inet_ntoa(tpa) == self.ip:
                reply = struct.pack("!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, 2, mac_bytes(self.mac),
                                    tpa, sha, spa)
                self.send_frame(mac_str(sha), ETH_P_ARP, reply)
            return
        ip = f.ip
        if ip is None or ip[1] != self.ip:
            return
        src, dst, proto, l4 = ip
        if proto == 1 and l4[:1] == b"\x08":  # echo request
            ident, seq = struct.unpack("!HH", l4[4:8])
            reply = icmp_echo(0, ident, seq, l4[8:])
            self.send_frame(f.src_mac, ETH_P_IP, ip_packet(dst, src, 1, reply))
        elif proto == 17:
            sport, dport = struct.unpack("!HH", l4[:4])
            self.send_frame(f.src_mac, ETH_P_IP,
                            ip_packet(dst, src, 17, udp_segment(dport, sport, l4[8:])))
        elif proto == 6:
            sport, dport, seq = struct.unpack("!HHI", l4[:8])
            flags = l4[13]
            if flags & 0x02:  # SYN -> SYN-ACK
                seg = tcp_segment(dst, src, dport, sport, 1000, seq + 1, 0x12)
            elif flags & 0x01:  # FIN -> RST
                seg = tcp_segment(dst, src, dport, sport, 1001, 0, 0x04)
            else:
                return
            self.send_frame(f.src_mac, ETH_P_IP, ip_packet(dst, src, 6, seg))


def test_checksum_known_value() -> None:
    # RFC 1071 example
    assert checksum(bytes.fromhex("0001f203f4f5f6f7")) == (~0xDDF2 & 0xFFFF)
    packet = ip_packet("10.0.0.1", "10.0.0.2", 17, udp_segment(1, 2, b"x"))
    assert checksum(packet[:20]) == 0
    assert ipaddress.IPv4Address(Frame("", "", ETH_P_IP, packet).ip[0]) == ipaddress.IPv4Address(  # type: ignore[index]
        "10.0.0.1"
    )


def test_frame_parsing_rejects_non_ip() -> None:
    assert Frame("", "", ETH_P_ARP, b"\0" * 28).ip is None



# --- shared helpers of the network integration tests -------------------------------

ISOLATED = os.environ.get("METALD_ISOLATED") == "1" and os.geteuid() == 0
ROOT_ONLY = [
    pytest.mark.root,
    pytest.mark.skipif(not ISOLATED, reason="needs root inside tests/isolated.sh"),
]


def run(*cmd: str, check: bool = True) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}: {proc.stderr.strip()}")
    return proc.stdout


def host_links() -> list[str]:
    return [line.split(":")[1].strip().split("@")[0]
            for line in run("ip", "-o", "link", "show").splitlines()]


def namespaces() -> list[str]:
    return netns.list_names()


def nft_elements(family: str, table: str, name: str, kind: str = "set") -> list[str]:
    out = run("nft", "-j", "list", kind, family, table, name, check=False)
    if not out:
        return []
    elems = []
    for obj in json.loads(out)["nftables"]:
        body = obj.get(kind)
        if body:
            elems += [json.dumps(e) for e in body.get("elem", [])]
    return elems


def all_vm_elements() -> list[str]:
    return (nft_elements("bridge", "metald", "vm_src") + nft_elements("bridge", "metald", "vm_mac")
            + nft_elements("inet", "metald", "fwd_tcp", "map")
            + nft_elements("inet", "metald", "fwd_udp", "map"))


def permanent_neighbours(dev: str = "br-vms") -> list[str]:
    return [line for line in run("ip", "neigh", "show", "dev", dev, check=False).splitlines()
            if "PERMANENT" in line]


def reset_host() -> None:
    """Remove everything network tests make (inside the private namespace)."""
    assert ISOLATED, "refusing to touch a network namespace tests/isolated.sh did not make"
    for name in namespaces():
        netns.remove_sync(name)
    for name in host_links():
        if name.startswith(("vh_", "cl0", "br-vms", "vbp_", "vbs_")):
            run("ip", "link", "del", name, check=False)
    run("nft", "flush", "ruleset", check=False)
