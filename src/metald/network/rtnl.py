"""A small, synchronous rtnetlink client for the per-VM hot path.

pyroute2 (0.9) runs an asyncio event loop inside every synchronous call and
builds its messages generically: about 0.5 ms per request and 0.3 ms per
socket here, which made netlink the largest part of setting up a VM's
network (a dozen requests). This module packs the few messages metald sends
per VM with :mod:`struct` on a plain ``AF_NETLINK`` socket (tens of
microseconds each) and offers the subset of pyroute2's ``IPRoute`` interface
that metald's network code uses (``link``, ``brport``, ``route``, ``neigh``,
``fdb``, ``get_links``, ``get_routes``, ``get_neighbours``, ``link_lookup``),
with the same attribute names and :class:`NetlinkError` for kernel errors.

A socket belongs to the network namespace of the thread that opened it.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

NETLINK_ROUTE = 0
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF

RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK, RTM_SETLINK = 16, 17, 18, 19
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 28, 29, 30
RTM_SETNEIGHTBL = 67
RTM_NEWNETCONF, RTM_GETNETCONF = 80, 82

AF_UNSPEC, AF_INET, AF_BRIDGE, AF_INET6 = 0, 2, 7, 10
IFF_UP = 0x1
RTPROT_BOOT = 3
RTN_UNICAST = 1
RT_SCOPE_UNIVERSE = 0
RT_TABLE_MAIN = 254

IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU = 1, 3, 4
IFLA_STATS, IFLA_MASTER, IFLA_PROTINFO = 7, 10, 12
IFLA_OPERSTATE, IFLA_LINKINFO = 16, 18
IFLA_IFALIAS, IFLA_STATS64, IFLA_AF_SPEC, IFLA_GROUP, IFLA_NET_NS_FD = 20, 23, 26, 27, 28
IFLA_INET_CONF = 1  # in IFLA_AF_SPEC/AF_INET: IPV4_DEVCONF_* values (set: nested u32s; get: an array)
IFLA_INET6_ADDR_GEN_MODE = 8  # in IFLA_AF_SPEC/AF_INET6 (u8)
IN6_ADDR_GEN_MODE_NONE = 1
# IPV4_DEVCONF_* (linux/ip.h): per-device IPv4 settings, the same values as
# /proc/sys/net/ipv4/conf/<dev>/..., settable over netlink
IPV4_DEVCONF_FORWARDING, IPV4_DEVCONF_PROXY_ARP, IPV4_DEVCONF_RP_FILTER = 1, 3, 8
NETCONFA_IFINDEX, NETCONFA_FORWARDING, NETCONFA_RP_FILTER = 1, 2, 3
NETCONFA_IFINDEX_ALL = -1
NDTA_NAME, NDTA_PARMS = 1, 6
NDTPA_IFINDEX, NDTPA_PROXY_DELAY = 1, 13
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
VETH_INFO_PEER = 1
IFLA_BRPORT_MODE = 4
IFLA_TUN_OWNER, IFLA_TUN_GROUP = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = 1, 4, 5, 15
NDA_DST, NDA_LLADDR = 1, 2
NUD_NOARP, NUD_PERMANENT = 0x40, 0x80  # neighbour states (FDB: NOARP is "static")
NTF_MASTER = 0x04  # an FDB entry of the bridge the port belongs to

_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")
_RTMSG = struct.Struct("=BBBBBBBBI")
_NDMSG = struct.Struct("=BBHiHBB")
_NLA = struct.Struct("=HH")
_NDTMSG = struct.Struct("=BxH")
_NETCONFMSG = struct.Struct("=B3x")
_STATS_FIELDS = (
    "rx_packets", "tx_packets", "rx_bytes", "tx_bytes", "rx_errors", "tx_errors",
    "rx_dropped", "tx_dropped", "multicast", "collisions",
)
RECV_BUFFER = 1 << 20


class Msg(dict[str, Any]):
    """A parsed message: header fields as items, attributes via :meth:`get_attr`."""

    def __init__(self, fields: dict[str, Any], attrs: dict[str, Any]) -> None:
        super().__init__(fields)
        self.attrs = attrs

    def get_attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)


# --- encoding --------------------------------------------------------------------


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attr(kind: int, payload: bytes) -> bytes:
    length = _NLA.size + len(payload)
    return _NLA.pack(length, kind) + payload + b"\0" * (_align(length) - length)


def _str(kind: int, value: str) -> bytes:
    return _attr(kind, value.encode() + b"\0")


def _u32(kind: int, value: int) -> bytes:
    return _attr(kind, struct.pack("=I", value))


def _mac(value: str) -> bytes:
    return bytes.fromhex(value.replace(":", "").replace("-", ""))


def _ip(value: str) -> bytes:
    return ipaddress.IPv4Address(value).packed


def _nested(kind: int, *parts: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, b"".join(parts))


# --- decoding --------------------------------------------------------------------


def _attrs(data: bytes, offset: int = 0) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    end = len(data)
    while offset + _NLA.size <= end:
        length, kind = _NLA.unpack_from(data, offset)
        if length < _NLA.size:
            break
        out[kind & NLA_TYPE_MASK] = data[offset + _NLA.size : offset + length]
        offset += _align(length)
    return out


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def _u32_of(raw: bytes) -> int:
    return int(struct.unpack_from("=I", raw)[0])


def _mac_str(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def _ip_str(raw: bytes) -> str:
    return str(ipaddress.ip_address(raw))


def _stats(raw: bytes, fmt: str) -> dict[str, int]:
    size = struct.calcsize(fmt)
    count = min(len(_STATS_FIELDS), len(raw) // size)
    values = struct.unpack_from(f"={count}{fmt}", raw)
    return dict(zip(_STATS_FIELDS, values, strict=False))


def _linkinfo(raw: bytes) -> Msg:
    a = _attrs(raw)
    kind = _cstr(a[IFLA_INFO_KIND]) if IFLA_INFO_KIND in a else None
    out: dict[str, Any] = {}
    if kind is not None:
        out["IFLA_INFO_KIND"] = kind
    if IFLA_INFO_DATA in a:
        data = _attrs(a[IFLA_INFO_DATA])
        info: dict[str, Any] = {}
        if kind == "tun":
            for key, name in ((IFLA_TUN_OWNER, "IFLA_TUN_OWNER"), (IFLA_TUN_GROUP, "IFLA_TUN_GROUP")):
                if key in data:
                    info[name] = _u32_of(data[key])
        out["IFLA_INFO_DATA"] = Msg({}, info)
    return Msg({}, out)


def _parse_link(body: bytes) -> Msg:
    family, kind, index, flags, _change = _IFINFOMSG.unpack_from(body)
    a = _attrs(body, _IFINFOMSG.size)
    attrs: dict[str, Any] = {}
    if IFLA_IFNAME in a:
        attrs["IFLA_IFNAME"] = _cstr(a[IFLA_IFNAME])
    if IFLA_ADDRESS in a:
        attrs["IFLA_ADDRESS"] = _mac_str(a[IFLA_ADDRESS])
    for key, name in ((IFLA_MASTER, "IFLA_MASTER"), (IFLA_GROUP, "IFLA_GROUP"), (IFLA_MTU, "IFLA_MTU")):
        if key in a:
            attrs[name] = _u32_of(a[key])
    if IFLA_IFALIAS in a:
        attrs["IFLA_IFALIAS"] = _cstr(a[IFLA_IFALIAS])
    if IFLA_LINKINFO in a:
        attrs["IFLA_LINKINFO"] = _linkinfo(a[IFLA_LINKINFO])
    if IFLA_AF_SPEC in a:
        inet = _attrs(a[IFLA_AF_SPEC]).get(AF_INET)
        conf = _attrs(inet).get(IFLA_INET_CONF) if inet is not None else None
        if conf is not None:  # a plain u32 array: entry i is IPV4_DEVCONF_* number i + 1
            values = struct.unpack_from(f"={len(conf) // 4}I", conf)
            attrs["IFLA_INET_CONF"] = {i + 1: value for i, value in enumerate(values)}
    if IFLA_STATS64 in a:
        attrs["IFLA_STATS64"] = _stats(a[IFLA_STATS64], "Q")
    if IFLA_STATS in a:
        attrs["IFLA_STATS"] = _stats(a[IFLA_STATS], "I")
    fields = {"family": family, "ifi_type": kind, "index": index, "flags": flags}
    return Msg(fields, attrs)


def _parse_netconf(body: bytes) -> Msg:
    a = _attrs(body, _NETCONFMSG.size)
    attrs = {name: _u32_of(a[key]) for key, name in ((NETCONFA_FORWARDING, "forwarding"),
                                                       (NETCONFA_RP_FILTER, "rp_filter")) if key in a}
    return Msg({"family": body[0]}, attrs)


def _parse_route(body: bytes) -> Msg:
    family, dst_len, src_len, tos, table, proto, scope, kind, flags = _RTMSG.unpack_from(body)
    a = _attrs(body, _RTMSG.size)
    attrs: dict[str, Any] = {}
    if RTA_DST in a:
        attrs["RTA_DST"] = _ip_str(a[RTA_DST])
    if RTA_GATEWAY in a:
        attrs["RTA_GATEWAY"] = _ip_str(a[RTA_GATEWAY])
    if RTA_OIF in a:
        attrs["RTA_OIF"] = _u32_of(a[RTA_OIF])
    attrs["RTA_TABLE"] = _u32_of(a[RTA_TABLE]) if RTA_TABLE in a else table
    fields = {
        "family": family, "dst_len": dst_len, "src_len": src_len, "tos": tos, "table": table,
        "proto": proto, "scope": scope, "type": kind, "flags": flags,
    }
    return Msg(fields, attrs)


def _parse_neigh(body: bytes) -> Msg:
    family, _p1, _p2, ifindex, state, flags, kind = _NDMSG.unpack_from(body)
    a = _attrs(body, _NDMSG.size)
    attrs: dict[str, Any] = {}
    if NDA_DST in a:
        attrs["NDA_DST"] = _ip_str(a[NDA_DST]) if len(a[NDA_DST]) in (4, 16) else _mac_str(a[NDA_DST])
    if NDA_LLADDR in a:
        attrs["NDA_LLADDR"] = _mac_str(a[NDA_LLADDR])
    fields = {"family": family, "ifindex": ifindex, "state": state, "flags": flags, "ndm_type": kind}
    return Msg(fields, attrs)


_PARSERS = {
    RTM_NEWLINK: _parse_link,
    RTM_NEWROUTE: _parse_route,
    RTM_NEWNEIGH: _parse_neigh,
    RTM_NEWNETCONF: _parse_netconf,
}


class Rtnl:
    """One NETLINK_ROUTE socket (no multicast groups); not thread-safe."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
        try:
            self._sock.bind((0, 0))
        except BaseException:
            self._sock.close()
            raise
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int:
        return self._sock.fileno()

    # --- transport -------------------------------------------------------------
    def request(self, kind: int, flags: int, body: bytes) -> list[Msg]:
        """Send one request; return the parsed replies (NetlinkError on a kernel error)."""
        self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
        seq = self._seq
        dump = flags & NLM_F_DUMP == NLM_F_DUMP
        if not dump:
            flags |= NLM_F_ACK
        header = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | flags, seq, 0)
        self._sock.send(header + body)
        out: list[Msg] = []
        while True:
            data = self._sock.recv(RECV_BUFFER)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, mtype, _mflags, mseq, _pid = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size:
                    raise OSError(errno.EPROTO, "malformed netlink message")
                body_of = data[offset + _NLMSGHDR.size : offset + length]
                offset += _align(length)
                if mseq != seq:
                    continue  # a late answer to an earlier, abandoned request
                if mtype == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", body_of)[0]
                    if code:
                        raise NetlinkError(code, os.strerror(code))
                    return out  # the ACK ends a non-dump request
                if mtype == NLMSG_DONE:
                    return out
                parser = _PARSERS.get(mtype)
                if parser is not None:
                    out.append(parser(body_of))

    # --- links -----------------------------------------------------------------
    def link(self, command: str, **kw: Any) -> list[Msg]:
        if command == "get":
            body = _IFINFOMSG.pack(AF_UNSPEC, 0, kw.get("index", 0), 0, 0)
            if "ifname" in kw:
                body += _str(IFLA_IFNAME, kw["ifname"])
            return self._get(RTM_GETLINK, body)
        if command == "del":
            body = _IFINFOMSG.pack(AF_UNSPEC, 0, kw.get("index", 0), 0, 0)
            if kw.get("ifname"):
                body += _str(IFLA_IFNAME, kw["ifname"])
            if kw.get("group") is not None:
                body += _u32(IFLA_GROUP, kw["group"])
            return self.request(RTM_DELLINK, 0, body)
        if command == "add":
            return self.request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, self._link_body(0, kw))
        if command == "set":
            return self.request(RTM_NEWLINK, 0, self._link_body(kw["index"], kw))
        raise ValueError(f"unsupported link command {command!r}")

    @staticmethod
    def _link_body(index: int, kw: dict[str, Any]) -> bytes:
        flags, change = kw.get("flags", 0), kw.get("change", 0)
        if kw.get("state") == "up":
            flags, change = flags | IFF_UP, change | IFF_UP
        elif kw.get("state") == "down":
            flags, change = flags & ~IFF_UP, change | IFF_UP
        parts = [_IFINFOMSG.pack(AF_UNSPEC, 0, index, flags, change)]
        if kw.get("ifname"):
            parts.append(_str(IFLA_IFNAME, kw["ifname"]))
        if kw.get("address"):
            parts.append(_attr(IFLA_ADDRESS, _mac(kw["address"])))
        if kw.get("master") is not None:
            parts.append(_u32(IFLA_MASTER, kw["master"]))
        if kw.get("group") is not None:
            parts.append(_u32(IFLA_GROUP, kw["group"]))
        if kw.get("ifalias") is not None:
            parts.append(_str(IFLA_IFALIAS, kw["ifalias"]))
        if kw.get("net_ns_fd") is not None:
            parts.append(_u32(IFLA_NET_NS_FD, kw["net_ns_fd"]))
        af_spec = []
        if kw.get("inet_conf"):
            conf = b"".join(_u32(key, value) for key, value in sorted(kw["inet_conf"].items()))
            af_spec.append(_nested(AF_INET, _nested(IFLA_INET_CONF, conf)))
        if kw.get("inet6_addr_gen_mode") is not None:
            mode = _attr(IFLA_INET6_ADDR_GEN_MODE, struct.pack("=B", kw["inet6_addr_gen_mode"]))
            af_spec.append(_nested(AF_INET6, mode))
        if af_spec:
            parts.append(_nested(IFLA_AF_SPEC, *af_spec))
        kind = kw.get("kind")
        if kind:
            info = [_str(IFLA_INFO_KIND, kind)]
            peer = kw.get("peer")
            if kind == "veth" and peer:
                peer_parts = [_IFINFOMSG.pack(AF_UNSPEC, 0, 0, 0, 0), _str(IFLA_IFNAME, peer["ifname"])]
                if peer.get("address"):
                    peer_parts.append(_attr(IFLA_ADDRESS, _mac(peer["address"])))
                if peer.get("net_ns_fd") is not None:
                    peer_parts.append(_u32(IFLA_NET_NS_FD, peer["net_ns_fd"]))
                info.append(_nested(IFLA_INFO_DATA, _attr(VETH_INFO_PEER, b"".join(peer_parts))))
            parts.append(_nested(IFLA_LINKINFO, *info))
        return b"".join(parts)

    def brport(self, command: str, index: int, mode: int | None = None, **kw: Any) -> list[Msg]:
        """Bridge port settings (``mode``: hairpin); ``ifalias``/``flags`` go to the link."""
        if command != "set":
            raise ValueError(f"unsupported brport command {command!r}")
        if kw:
            self.link("set", index=index, **kw)
        if mode is None:
            return []
        body = _IFINFOMSG.pack(AF_BRIDGE, 0, index, 0, 0)
        body += _nested(IFLA_PROTINFO, _attr(IFLA_BRPORT_MODE, struct.pack("=B", mode)))
        return self.request(RTM_SETLINK, 0, body)

    def get_links(self, *indices: int) -> list[Msg]:
        if indices:
            return [m for i in indices for m in self.link("get", index=i)]
        return self.request(RTM_GETLINK, NLM_F_DUMP, _IFINFOMSG.pack(AF_UNSPEC, 0, 0, 0, 0))

    def link_lookup(self, ifname: str) -> list[int]:
        """Index of ``ifname`` in this socket's namespace ([] if there is none)."""
        try:
            return [m["index"] for m in self.link("get", ifname=ifname)]
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return []
            raise

    # --- routes ----------------------------------------------------------------
    def route(self, command: str, **kw: Any) -> list[Msg]:
        dst = kw.get("dst", "default")
        table = kw.get("table", RT_TABLE_MAIN)
        if dst == "default":
            dst_len, dst_raw = 0, b""
        else:
            net = ipaddress.IPv4Network(dst, strict=False)
            dst_len, dst_raw = net.prefixlen, net.network_address.packed
        scope = kw.get("scope", RT_SCOPE_UNIVERSE)
        if command == "del":
            head = _RTMSG.pack(AF_INET, dst_len, 0, 0, table & 0xFF, 0, 0xFF, 0, 0)  # RT_SCOPE_NOWHERE: any
            flags = 0
            kind = RTM_DELROUTE
        else:
            head = _RTMSG.pack(AF_INET, dst_len, 0, 0, table & 0xFF, RTPROT_BOOT, scope, RTN_UNICAST, 0)
            flags = {"add": NLM_F_CREATE | NLM_F_EXCL, "replace": NLM_F_CREATE | NLM_F_REPLACE}[command]
            kind = RTM_NEWROUTE
        parts = [head]
        if dst_raw:
            parts.append(_attr(RTA_DST, dst_raw))
        if kw.get("gateway"):
            parts.append(_attr(RTA_GATEWAY, _ip(kw["gateway"])))
        if kw.get("oif") is not None:
            parts.append(_u32(RTA_OIF, kw["oif"]))
        parts.append(_u32(RTA_TABLE, table))
        return self.request(kind, flags, b"".join(parts))

    def get_routes(self, family: int = AF_INET, table: int | None = None) -> list[Msg]:
        found = self.request(RTM_GETROUTE, NLM_F_DUMP, _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0))
        return [r for r in found if table is None or r.get_attr("RTA_TABLE") == table]

    # --- neighbours ------------------------------------------------------------
    def neigh(self, command: str, dst: str, ifindex: int, lladdr: str | None = None, state: int = 0) -> list[Msg]:
        parts = [_NDMSG.pack(AF_INET, 0, 0, ifindex, state if command != "get" else 0, 0, 0)]
        parts.append(_attr(NDA_DST, _ip(dst)))
        if command == "get":
            return self._get(RTM_GETNEIGH, b"".join(parts))
        if lladdr:
            parts.append(_attr(NDA_LLADDR, _mac(lladdr)))
        if command == "del":
            return self.request(RTM_DELNEIGH, 0, b"".join(parts))
        flags = {"add": NLM_F_CREATE | NLM_F_EXCL, "replace": NLM_F_CREATE | NLM_F_REPLACE}[command]
        return self.request(RTM_NEWNEIGH, flags, b"".join(parts))

    def fdb(self, command: str, ifindex: int, lladdr: str, state: int = 0, flags: int = 0) -> list[Msg]:
        """A bridge forwarding-database entry of port ``ifindex`` (``bridge fdb
        replace|del|get``; get answers the entry or raises ENOENT)."""
        if command == "get":
            body = _NDMSG.pack(AF_BRIDGE, 0, 0, ifindex, 0, flags, 0) + _attr(NDA_LLADDR, _mac(lladdr))
            return self._get(RTM_GETNEIGH, body)
        body = _NDMSG.pack(AF_BRIDGE, 0, 0, ifindex, state, flags, 0) + _attr(NDA_LLADDR, _mac(lladdr))
        if command == "del":
            return self.request(RTM_DELNEIGH, 0, body)
        if command != "replace":
            raise ValueError(f"unsupported fdb command {command!r}")
        return self.request(RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE, body)

    def get_neighbours(self, family: int = AF_INET, ifindex: int | None = None) -> list[Msg]:
        found = self.request(RTM_GETNEIGH, NLM_F_DUMP, _NDMSG.pack(family, 0, 0, 0, 0, 0, 0))
        return [n for n in found if ifindex is None or n["ifindex"] == ifindex]

    # --- per-namespace and per-device settings -----------------------------------
    def netconf(self, ifindex: int = NETCONFA_IFINDEX_ALL) -> dict[str, int]:
        """IPv4 ``forwarding`` and ``rp_filter`` of a device or of ``all`` (the
        default), as ``/proc/sys/net/ipv4/conf/<dev>/`` shows them."""
        body = _NETCONFMSG.pack(AF_INET) + _attr(NETCONFA_IFINDEX, struct.pack("=i", ifindex))
        out: dict[str, int] = {}
        for msg in self._get(RTM_GETNETCONF, body):
            out.update(msg.attrs)
        return out

    def set_proxy_delay(self, ifindex: int, delay_ms: int) -> list[Msg]:
        """ARP ``proxy_delay`` of one device (``net/ipv4/neigh/<dev>/proxy_delay``)."""
        parms = _nested(
            NDTA_PARMS,
            _u32(NDTPA_IFINDEX, ifindex),
            _attr(NDTPA_PROXY_DELAY, struct.pack("=Q", delay_ms)),
        )
        body = _NDTMSG.pack(AF_INET, 0) + _str(NDTA_NAME, "arp_cache") + parms
        return self.request(RTM_SETNEIGHTBL, 0, body)

    # --- helpers ---------------------------------------------------------------
    def _get(self, kind: int, body: bytes) -> list[Msg]:
        """A non-dump GET: the kernel answers with the object (no ACK) or an error."""
        return self.request(kind, 0, body)
