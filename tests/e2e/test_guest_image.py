"""Boot the bundled guest image directly with QEMU (microvm, TCG), not through metald.

One boot checks the guest contract the rest of metald relies on (see guest/README.md):
the READY marker on the serial console, the HTTP server on port 8080 answering with
the VM id over a TAP in a network namespace this test creates, QMP stop/cont freezing
and resuming the METALD_TICK lines, and a clean power-off on QMP system_powerdown
(QEMU exits with SHUTDOWN reason guest-shutdown).
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
IMAGE_DIR = Path(os.environ.get("UNKEY_METALD_IMAGE_DIR") or REPO / "build" / "image")
IMAGE_FILES = ("vmlinuz", "initramfs.cpio.gz", "rootfs.ext4", "cmdline")
QEMU = shutil.which("qemu-system-x86_64")
BOOT_TIMEOUT = 90.0  # ~2.5 s on an idle host, ~10 s with both cores busy

GUEST_IP = "10.200.0.2"
HOST_IP = "10.200.0.1"

pytestmark = [
    pytest.mark.vm,
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (TAP devices, network namespaces)"),
    pytest.mark.skipif(
        not all((IMAGE_DIR / f).is_file() for f in IMAGE_FILES),
        reason=f"guest image not built in {IMAGE_DIR} (run: make image)",
    ),
    pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not installed (run: make deps)"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 not installed"),
]


def host_tsc_khz() -> int:
    """The host's TSC frequency in kHz, which is also the TCG guest's TSC frequency.

    The guest kernel must be told it (tsc_early_khz=) because microvm has no HPET or
    ACPI PM timer and PIT calibration fails on a busy host, after which the kernel
    hangs in early boot. Measured with RDTSC against CLOCK_MONOTONIC.
    """
    code = bytes.fromhex("0f31" "48c1e220" "4809d0" "c3")  # rdtsc; shl rdx,32; or rax,rdx; ret
    prot = mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC
    buf = mmap.mmap(-1, mmap.PAGESIZE, prot=prot)
    buf.write(code)
    fn_type = ctypes.CFUNCTYPE(ctypes.c_uint64)
    rdtsc = fn_type(ctypes.addressof(ctypes.c_char.from_buffer(buf)))
    samples = []
    for _ in range(3):
        a0 = time.monotonic_ns()
        c0 = rdtsc()
        b0 = time.monotonic_ns()
        time.sleep(0.05)
        a1 = time.monotonic_ns()
        c1 = rdtsc()
        b1 = time.monotonic_ns()
        khz = (c1 - c0) * 1_000_000 / (((a1 + b1) - (a0 + b0)) / 2)
        samples.append(((b0 - a0) + (b1 - a1), khz))
    del rdtsc
    return int(min(samples)[1])


class Qmp:
    """Minimal synchronous QMP client over a unix socket."""

    def __init__(self, path: Path, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.sock.settimeout(timeout)
        self.file = self.sock.makefile("rwb")
        self.events: list[dict] = []
        greeting = self._read()
        assert "QMP" in greeting, greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict:
        line = self.file.readline()
        if not line:
            raise EOFError("QMP connection closed")
        return json.loads(line)

    def execute(self, cmd: str, **args) -> dict:
        msg = {"execute": cmd}
        if args:
            msg["arguments"] = args
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise RuntimeError(f"QMP {cmd}: {reply['error']}")
            return reply["return"]

    def wait_event(self, name: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for ev in self.events:
                if ev["event"] == name:
                    return ev
            self.sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                self.events.append(self._read())
            except TimeoutError:
                raise TimeoutError(f"no QMP {name} event; got {self.events}") from None

    def close(self) -> None:
        try:
            self.file.close()
        finally:
            self.sock.close()


def _wait_console(path: Path, pattern: str, timeout: float, proc: subprocess.Popen) -> re.Match:
    deadline = time.monotonic() + timeout
    rx = re.compile(pattern)
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        m = rx.search(text)
        if m:
            return m
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    text = path.read_text(errors="replace") if path.exists() else ""
    raise AssertionError(f"{pattern!r} not on the console (qemu rc={proc.poll()}):\n{text[-3000:]}")


def _ticks(path: Path) -> list[int]:
    return [int(n) for n in re.findall(r"^METALD_TICK (\d+)\r?$", path.read_text(), re.M)]


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=30)


def _http_get_in_netns(ns: str, url: str) -> str:
    if shutil.which("curl"):
        cmd = ["curl", "-sS", "--max-time", "5", "--retry", "5", "--retry-connrefused",
               "--retry-delay", "1", url]
    else:
        cmd = ["python3", "-c",
               f"import urllib.request;print(urllib.request.urlopen({url!r},timeout=5)"
               ".read().decode(),end='')"]
    return _run("ip", "netns", "exec", ns, *cmd).stdout


def test_guest_image_boot_http_pause_poweroff(tmp_path: Path) -> None:
    ns = f"imgtest-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    vm_id = f"vm-{uuid.uuid4().hex[:8]}"
    console = tmp_path / "console.log"
    qmp_path = tmp_path / "qmp.sock"
    cmdline = (IMAGE_DIR / "cmdline").read_text().strip()
    append = (f"{cmdline} tsc_early_khz={host_tsc_khz()} metald.vm_id={vm_id} "
              f"ip={GUEST_IP}::{HOST_IP}:255.255.255.0:{vm_id}-host:eth0:off")
    argv = [
        QEMU, "-M", "microvm", "-accel", "tcg", "-m", "256", "-smp", "1",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-kernel", str(IMAGE_DIR / "vmlinuz"),
        "-initrd", str(IMAGE_DIR / "initramfs.cpio.gz"),
        "-append", append,
        "-chardev", f"file,id=c0,path={console},append=on", "-serial", "chardev:c0",
        "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
        "-device", "virtio-net-device,netdev=n0,mac=02:00:0a:c8:00:02",
        "-drive", f"id=d0,file={IMAGE_DIR / 'rootfs.ext4'},format=raw,if=none,readonly=on",
        "-device", "virtio-blk-device,drive=d0",
        "-qmp", f"unix:{qmp_path},server=on,wait=off",
    ]
    proc: subprocess.Popen | None = None
    qmp: Qmp | None = None
    _run("ip", "netns", "add", ns)
    try:
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "-n", ns, "tuntap", "add", "tap0", "mode", "tap")
        _run("ip", "-n", ns, "addr", "add", f"{HOST_IP}/24", "dev", "tap0")
        _run("ip", "-n", ns, "link", "set", "tap0", "up")

        t0 = time.monotonic()
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        qmp = Qmp(qmp_path)

        m = _wait_console(console, r"METALD_GUEST_READY vm_id=(\S+) boot_id=(\S+)",
                          BOOT_TIMEOUT, proc)
        boot_s = time.monotonic() - t0
        assert m.group(1) == vm_id
        print(f"guest READY after {boot_s:.1f} s")

        body = _http_get_in_netns(ns, f"http://{GUEST_IP}:8080/")
        assert body.strip() == vm_id
        info = _http_get_in_netns(ns, f"http://{GUEST_IP}:8080/info")
        assert f"hostname={vm_id}-host" in info
        assert "rootfs=metald bundled rootfs" in info  # /dev/vda mounted

        # A paused guest makes no progress; a resumed one continues.
        _wait_console(console, r"METALD_TICK 1\b", 30, proc)
        qmp.execute("stop")
        time.sleep(0.3)  # a line already in the serial FIFO may still land
        frozen = _ticks(console)
        time.sleep(1.5)
        assert _ticks(console) == frozen
        assert qmp.execute("query-status")["status"] == "paused"
        qmp.execute("cont")
        _wait_console(console, rf"METALD_TICK {frozen[-1] + 1}\b", 30, proc)

        # Graceful power-off: ACPI power button -> acpid -> init -> poweroff.
        qmp.execute("system_powerdown")
        ev = qmp.wait_event("SHUTDOWN", 60)
        assert ev["data"] == {"guest": True, "reason": "guest-shutdown"}
        assert proc.wait(timeout=30) == 0
        assert "METALD_GUEST_POWEROFF" in console.read_text()
    finally:
        if qmp is not None:
            qmp.close()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        _run("ip", "netns", "del", ns, check=False)
