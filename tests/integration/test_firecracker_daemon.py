"""`metald serve` chooses (or refuses) the Firecracker backend with a clear message.

Exit code 2 and one line naming what is missing and how to fix it, before
anything on the host changes (networking is off here). The Firecracker in
these tests is THE TEST DOUBLE (tests/firecracker_double).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from metald.backends.firecracker.backend import kvm_unusable
from tests.conftest import ROOT
from tests.firecracker_double import harness
from tests.support.daemon import METALD, DaemonProcess

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the jailer checks need root")


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    return DaemonProcess(tmp, UNKEY_METALD_NETWORK_ENABLED="false", **extra).env


def _serve(env: dict[str, str], argv: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv or [*METALD, "serve"], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT, check=False
    )


def _shim(tmp: Path) -> Path:
    d = tmp / "shim"
    d.mkdir(exist_ok=True)
    return harness.make_shim(d, tmp / "requests.jsonl")


def test_missing_binary_refuses_to_start(tmp_path: Path) -> None:
    env = _env(
        tmp_path,
        UNKEY_METALD_BACKEND="firecracker",
        UNKEY_METALD_FIRECRACKER_BINARY=str(tmp_path / "no-firecracker"),
        UNKEY_METALD_JAILER_ENABLED="false",
    )
    result = _serve(env)
    assert result.returncode == 2, result.stderr
    err = result.stderr
    assert "metald: cannot start: backend firecracker cannot run on this host" in err
    assert "no-firecracker" in err and "missing" in err
    assert "firecracker-v1.16.1-x86_64" in err and "UNKEY_METALD_FIRECRACKER_BINARY" in err


@needs_root
def test_jailer_needs_a_static_binary(tmp_path: Path) -> None:
    """The jailer chroots Firecracker: a script or dynamic binary could not start there."""
    env = _env(tmp_path, UNKEY_METALD_BACKEND="firecracker", UNKEY_METALD_FIRECRACKER_BINARY=str(_shim(tmp_path)))
    result = _serve(env)
    assert result.returncode == 2, result.stderr
    assert "is not an ELF executable" in result.stderr and "static" in result.stderr


@needs_root
def test_unusable_kvm_refuses_to_start(tmp_path: Path) -> None:
    """/dev/kvm replaced (in a private mount namespace) by a file that opens but is no KVM device."""
    fake = tmp_path / "kvm"
    fake.write_bytes(b"")
    env = _env(
        tmp_path,
        UNKEY_METALD_BACKEND="firecracker",
        UNKEY_METALD_FIRECRACKER_BINARY=str(_shim(tmp_path)),
        UNKEY_METALD_JAILER_ENABLED="false",
    )
    hide_kvm = (
        "import os, sys\n"
        "from metald.jailer import syscalls as s\n"
        "s.unshare(s.CLONE_NEWNS)\n"
        "s.mount(None, '/', None, s.MS_REC | s.MS_PRIVATE)\n"
        f"s.mount({str(fake)!r}, '/dev/kvm', None, s.MS_BIND)\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'metald.cli.main', 'serve'])\n"
    )
    result = _serve(env, [sys.executable, "-c", hide_kvm])
    assert result.returncode == 2, result.stderr
    assert "/dev/kvm is no KVM device" in result.stderr and "modprobe kvm_intel" in result.stderr


def test_auto_without_firecracker_uses_qemu(tmp_path: Path) -> None:
    d = DaemonProcess(
        tmp_path,
        UNKEY_METALD_BACKEND="auto",
        UNKEY_METALD_FIRECRACKER_BINARY=str(tmp_path / "no-firecracker"),
        UNKEY_METALD_JAILER_ENABLED="false",
        UNKEY_METALD_NETWORK_ENABLED="false",
    )
    d.start()
    try:
        messages = [r.get("msg", "") for r in d.log_records()]
        assert any(
            m.startswith("backend: qemu (auto; firecracker not usable:") and "no-firecracker" in m for m in messages
        ), messages
    finally:
        d.kill()


def test_auto_with_usable_firecracker_uses_it(tmp_path: Path) -> None:
    if kvm_unusable(Path("/dev/kvm")) is not None:
        pytest.skip(f"no usable /dev/kvm here: {kvm_unusable(Path('/dev/kvm'))}")
    d = DaemonProcess(
        tmp_path,
        UNKEY_METALD_BACKEND="auto",
        UNKEY_METALD_FIRECRACKER_BINARY=str(_shim(tmp_path)),
        UNKEY_METALD_JAILER_ENABLED="false",
        UNKEY_METALD_NETWORK_ENABLED="false",
    )
    d.start()
    try:
        messages = [r.get("msg", "") for r in d.log_records()]
        assert "backend: firecracker (auto)" in messages, messages
        assert any("UNJAILED" in m for m in messages), messages
    finally:
        d.kill()


@needs_root
@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("UNKEY_METALD_JAILER_UID", "0", "UNKEY_METALD_JAILER_UID: must not be 0"),
        ("UNKEY_METALD_JAILER_GID", "0", "UNKEY_METALD_JAILER_GID: must not be 0"),
        ("UNKEY_METALD_JAILER_CHROOT_DIR", "<file>", "exists and is not a directory"),
        ("UNKEY_METALD_JAILER_FD_LIMIT", "70", "UNKEY_METALD_JAILER_FD_LIMIT: 70 is below"),
    ],
)
def test_jailer_settings_that_cannot_work(tmp_path: Path, variable: str, value: str, expected: str) -> None:
    if value == "<file>":
        value = str(tmp_path / "a-file")
        Path(value).write_text("")
    env = _env(tmp_path, UNKEY_METALD_BACKEND="firecracker", UNKEY_METALD_FIRECRACKER_BINARY=str(_shim(tmp_path)))
    env[variable] = value
    result = _serve(env)
    assert result.returncode == 2, result.stderr
    assert variable in result.stderr and expected in result.stderr, result.stderr
