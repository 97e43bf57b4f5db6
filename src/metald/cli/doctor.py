"""``metald doctor``: check every prerequisite the install guides list.

Each check prints ok, or what is wrong and the command that fixes it. The exit
status is non-zero when something blocks running VMs (a ``fail``); ``warn``
findings are worth fixing but do not block.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from metald.config import ConfigError, Settings, load_settings
from metald.core.layout import NETNS_DIR


@dataclass
class Finding:
    name: str
    status: str  # ok | warn | fail
    detail: str
    fix: str = ""


Check = Callable[[Settings], Finding]
PROC_SYS = Path(os.environ.get("METALD_DOCTOR_PROC_SYS", "/proc/sys"))


def check_ip_forward(s: Settings) -> Finding:
    path = PROC_SYS / "net/ipv4/ip_forward"
    try:
        value = path.read_text().strip()
    except OSError as exc:
        return Finding("ip_forward", "fail", f"cannot read {path}: {exc.strerror}")
    if value == "1":
        return Finding("ip_forward", "ok", "net.ipv4.ip_forward = 1")
    return Finding(
        "ip_forward",
        "fail",
        "net.ipv4.ip_forward is 0: VMs cannot reach anything beyond the host",
        "sysctl -w net.ipv4.ip_forward=1 && echo 'net.ipv4.ip_forward = 1' > /etc/sysctl.d/99-metald.conf",
    )


def _binary(name: str, package: str, blocking: bool = True) -> Check:
    def check(s: Settings) -> Finding:
        found = shutil.which(name)
        if found:
            return Finding(name, "ok", found)
        return Finding(
            name, "fail" if blocking else "warn", f"{name} not found", f"apt-get install -y {package}"
        )

    return check


def check_backend(s: Settings) -> Finding:
    fc = Path(s.firecracker_binary)
    fc_ok = fc.is_file() and os.access(fc, os.X_OK)
    qemu = shutil.which(s.qemu_binary)
    if s.backend == "firecracker" and not fc_ok:
        return Finding(
            "backend",
            "fail",
            f"UNKEY_METALD_BACKEND=firecracker but {fc} is missing",
            "install the Firecracker release binaries as /usr/local/bin/firecracker and "
            "/usr/local/bin/jailer, or set UNKEY_METALD_BACKEND=qemu",
        )
    if s.backend in ("qemu", "auto") and not fc_ok and not qemu:
        return Finding(
            "backend", "fail", "neither Firecracker nor QEMU is installed", "apt-get install -y qemu-system-x86"
        )
    chosen = "firecracker" if (s.backend == "firecracker" or (s.backend == "auto" and fc_ok)) else "qemu"
    return Finding("backend", "ok", f"{chosen} ({fc if chosen == 'firecracker' else qemu})")


def check_firecracker_jailer(s: Settings) -> Finding:
    fc = Path(s.firecracker_binary)
    jailer = Path(s.firecracker_jailer_binary)
    if not fc.exists():
        return Finding("firecracker", "ok", f"not installed ({fc}); the QEMU backend is used")
    if not jailer.exists():
        return Finding(
            "firecracker", "warn", f"{fc} present but {jailer} is missing",
            "copy the jailer binary from the Firecracker release to /usr/local/bin/jailer",
        )
    return Finding("firecracker", "ok", f"{fc} and {jailer}")


def check_kvm(s: Settings) -> Finding:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
        os.close(fd)
    except OSError as exc:
        status = "fail" if s.backend == "firecracker" else "warn"
        return Finding(
            "kvm", status, f"/dev/kvm not usable ({exc.strerror}); QEMU falls back to TCG emulation",
            "enable virtualization in the BIOS / nested virtualization, then modprobe kvm_intel or kvm_amd",
        )
    return Finding(
        "kvm", "ok",
        "/dev/kvm opens (with UNKEY_METALD_QEMU_ACCEL=auto, QEMU still proves a guest boots with it)",
    )


def check_cgroups(s: Settings) -> Finding:
    root = Path("/sys/fs/cgroup")
    if (root / "cgroup.controllers").exists():
        controllers = (root / "cgroup.controllers").read_text().split()
        kind = "v2"
    elif (root / "unified" / "cgroup.controllers").exists():
        controllers = [c for c in ("memory", "cpu", "pids") if (root / c).is_dir()]
        kind = "hybrid (v1 controllers, v2 at /sys/fs/cgroup/unified)"
    else:
        controllers = [c for c in ("memory", "cpu", "pids") if (root / c).is_dir()]
        kind = "v1"
    missing = [c for c in ("memory", "cpu", "pids") if c not in controllers]
    if missing:
        return Finding(
            "cgroups", "fail" if s.jailer_enabled else "warn",
            f"cgroup {kind}: controllers {', '.join(missing)} unavailable",
            "boot with systemd.unified_cgroup_hierarchy=1 or mount the missing v1 controllers",
        )
    return Finding("cgroups", "ok", f"cgroup {kind}: memory, cpu, pids; VMs under {s.jailer_cgroup_parent}/")


def _dir_check(name: str, attr: str, mode_hint: str) -> Check:
    def check(s: Settings) -> Finding:
        path = Path(getattr(s, attr))
        if path.exists() and not path.is_dir():
            return Finding(name, "fail", f"{path} exists but is not a directory", f"rm {path} && mkdir -p {path}")
        if not path.exists():
            return Finding(
                name, "warn", f"{path} does not exist (metald creates it)", f"install -d -m {mode_hint} {path}"
            )
        if not os.access(path, os.W_OK):
            return Finding(name, "fail", f"{path} is not writable", f"chown root: {path} && chmod {mode_hint} {path}")
        return Finding(name, "ok", str(path))

    return check


def check_netns_dir(s: Settings) -> Finding:
    path = NETNS_DIR
    if path.is_dir():
        return Finding("netns_dir", "ok", str(path))
    return Finding(
        "netns_dir", "warn", "/run/netns missing (created by the first namespace)",
        "systemd-tmpfiles --create /etc/tmpfiles.d/metald.conf",
    )


def check_jailer(s: Settings) -> Finding:
    if not s.jailer_enabled:
        return Finding("jailer", "warn", "UNKEY_METALD_JAILER_ENABLED=false: VMMs run unjailed (development only)",
                       "set UNKEY_METALD_JAILER_ENABLED=true in /etc/metald/metald.env")
    if s.jailer_uid == 0 or s.jailer_gid == 0:
        return Finding("jailer", "fail", "jailer uid/gid 0 defeats the jail",
                       "set UNKEY_METALD_JAILER_UID/GID to an unprivileged user (useradd -r jailer)")
    return Finding("jailer", "ok", f"uid {s.jailer_uid} gid {s.jailer_gid} under {s.jailer_chroot_dir}")


def check_spiffe(s: Settings) -> Finding:
    if s.tls_mode != "spiffe":
        detail = "TLS disabled: API bound to loopback" if s.tls_mode == "disabled" else f"TLS mode {s.tls_mode}"
        return Finding("spiffe", "ok", detail)
    sock = Path(str(s.spiffe_socket).removeprefix("unix://"))
    if not sock.is_socket():
        return Finding("spiffe", "fail", f"SPIRE agent socket {sock} missing", "systemctl start spire-agent")
    return Finding("spiffe", "ok", str(sock))


def check_image(s: Settings) -> Finding:
    missing = [n for n in ("vmlinuz", "initramfs.cpio.gz") if not (s.image_dir / n).is_file()]
    if missing:
        return Finding("guest_image", "warn", f"bundled image incomplete in {s.image_dir}: {', '.join(missing)}",
                       "make image && make install")
    return Finding("guest_image", "ok", str(s.image_dir))


def _store_vm_ids(s: Settings) -> set[str] | None:
    if not s.db_path.exists():
        return None
    db = sqlite3.connect(f"file:{s.db_path}?mode=ro", uri=True)
    try:
        return {row[0] for row in db.execute("SELECT vm_id FROM vms")}
    except sqlite3.Error:
        return None
    finally:
        db.close()


def check_ip_pool(s: Settings) -> Finding:
    subnet = ipaddress.ip_network(s.network_vm_subnet_ipv4)
    size = subnet.num_addresses - 3  # network, broadcast, bridge
    used = 0
    if s.db_path.exists():
        db = sqlite3.connect(f"file:{s.db_path}?mode=ro", uri=True)
        try:
            used = db.execute("SELECT COUNT(*) FROM ip_allocations").fetchone()[0]
        except sqlite3.Error:
            used = 0
        finally:
            db.close()
    free = size - used
    if free <= 0:
        return Finding("ip_pool", "fail", f"no free address in {subnet}",
                       "delete unused VMs or widen UNKEY_METALD_NETWORK_VM_SUBNET_IPV4")
    return Finding("ip_pool", "ok" if free > 16 else "warn", f"{free} of {size} addresses free in {subnet}")


def check_leftovers(s: Settings) -> Finding:
    known = _store_vm_ids(s) or set()
    netns = NETNS_DIR
    names = [p.name for p in netns.iterdir()] if netns.is_dir() else []
    stray = sorted(n for n in names if n.startswith("fc-") and n[3:] not in known)
    if stray:
        return Finding("leftovers", "warn", f"{len(stray)} namespaces of unknown VMs: {', '.join(stray[:5])}",
                       "metald cleanup")
    return Finding("leftovers", "ok", "no namespaces of unknown VMs")


def check_orphans(s: Settings) -> Finding:
    """VMs on this host with no record in the store (a lost or replaced database)."""
    from metald.recovery import orphans

    known = _store_vm_ids(s)
    empty = not known and not _store_has_events(s)
    found = orphans.scan(s, known or set(), empty)
    if found:
        return Finding("orphans", "fail", found.summary(),
                       "metald recover adopt (then restart metald), or metald cleanup --force")
    return Finding("orphans", "ok", "every VM on this host has a record in the store")


def _store_has_events(s: Settings) -> bool:
    if not s.db_path.exists():
        return False
    db = sqlite3.connect(f"file:{s.db_path}?mode=ro", uri=True)
    try:
        return db.execute("SELECT 1 FROM events LIMIT 1").fetchone() is not None
    except sqlite3.Error:
        return False
    finally:
        db.close()


def check_nat(s: Settings) -> Finding:
    nft = shutil.which("nft")
    if not nft:
        return Finding("nat", "warn", "nft not installed", "apt-get install -y nftables")
    out = subprocess.run([nft, "list", "tables"], capture_output=True, text=True, timeout=10)
    if "metald" in out.stdout:
        return Finding("nat", "ok", "metald nftables table present")
    return Finding("nat", "warn", "metald's nftables table is absent (metald creates it at start)",
                   "systemctl restart metald")


CHECKS: list[Check] = [
    check_ip_forward,
    _binary("ip", "iproute2"),
    _binary("nft", "nftables"),
    _binary("iptables", "iptables", blocking=False),
    check_backend,
    check_firecracker_jailer,
    check_kvm,
    check_cgroups,
    _dir_check("data_dir", "data_dir", "0750"),
    _dir_check("run_dir", "run_dir", "0750"),
    _dir_check("jailer_chroot_dir", "jailer_chroot_dir", "0755"),
    check_netns_dir,
    check_jailer,
    check_spiffe,
    check_image,
    # container images (docs/images.md): without these only VMs from files run
    _binary("skopeo", "skopeo", blocking=False),
    _binary("umoci", "umoci", blocking=False),
    _binary("qemu-img", "qemu-utils", blocking=False),
    _binary("gcc", "gcc libc6-dev", blocking=False),
    check_ip_pool,
    check_nat,
    check_leftovers,
    check_orphans,
]


def run_checks(settings: Settings) -> list[Finding]:
    findings = []
    for check in CHECKS:
        try:
            findings.append(check(settings))
        except Exception as exc:  # a broken check is itself a finding
            findings.append(Finding(check.__name__, "warn", f"check failed: {exc}"))
    return findings


def main(args: argparse.Namespace) -> int:
    try:
        settings = load_settings()
    except ConfigError as exc:
        finding = Finding("configuration", "fail", str(exc), "fix /etc/metald/metald.env")
        findings = [finding]
    else:
        findings = run_checks(settings)
    failed = any(f.status == "fail" for f in findings)
    if args.json:
        print(json.dumps({"ok": not failed, "checks": [asdict(f) for f in findings]}, indent=2))
    else:
        marks = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}
        for f in findings:
            print(f"[{marks[f.status]}] {f.name:<18} {f.detail}")
            if f.fix and f.status != "ok":
                print(f"       fix: {f.fix}")
        print("\nsomething blocks running VMs" if failed else "\nready to run VMs")
    return 1 if failed else 0
