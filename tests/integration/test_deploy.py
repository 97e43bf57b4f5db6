"""The deploy files and `make install`, as the install guides use them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "metald.service"

needs_systemd = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")


def _unit_for_this_checkout(tmp_path: Path) -> Path:
    unit = tmp_path / "metald.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/metald", str(ROOT / ".venv" / "bin" / "metald")))
    return unit


@needs_systemd
def test_unit_verifies(tmp_path: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", str(_unit_for_this_checkout(tmp_path))],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "metald.service" not in result.stderr, result.stderr  # no warnings about our unit


@needs_systemd
def test_unit_hardening_exposure(tmp_path: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(_unit_for_this_checkout(tmp_path))],
        capture_output=True, text=True, timeout=60,
    )
    match = re.search(r"Overall exposure level for metald.service: ([\d.]+)", result.stdout + result.stderr)
    assert match, result.stdout[-500:]
    assert float(match.group(1)) <= 6.0  # docs/security.md records 9.6 before and 5.8 after


def test_unit_keeps_vms_alive_and_runs_as_root() -> None:
    text = UNIT.read_text()
    assert "KillMode=process" in text  # stopping metald never signals the VMMs
    assert "User=root" in text and "EnvironmentFile=-/etc/metald/metald.env" in text
    for directive in ("ProtectHome=true", "PrivateTmp=true", "ProtectSystem=strict", "ReadWritePaths=",
                      "RestrictAddressFamilies=", "SystemCallFilter="):
        assert directive in text


def test_make_install_into_destdir(tmp_path: Path) -> None:
    if not (ROOT / "build" / "image" / "vmlinuz").exists():
        pytest.skip("guest image not built")
    dest = tmp_path / "root"
    # `make install` fetches Python packages from PyPI; the test suite's private
    # network namespace has no route out, so only this command runs in the
    # host's network namespace. It writes nothing but files under DESTDIR.
    command = ["make", "-C", str(ROOT), "install", f"DESTDIR={dest}"]
    if os.environ.get("METALD_ISOLATED") == "1":
        command = ["nsenter", "--net=/run/metald/host-netns", *command]  # see tests/isolated.sh
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for path in [
        "usr/local/bin/metald",
        "opt/metald/venv/bin/metald",
        "opt/metald/images/vmlinuz",
        "opt/metald/images/initramfs.cpio.gz",
        "opt/metald/data",
        "etc/systemd/system/metald.service",
        "etc/metald/metald.env",
        "etc/tmpfiles.d/metald.conf",
        "etc/sysctl.d/99-metald.conf",
        "etc/logrotate.d/metald",
        "etc/firewalld/services/metald.xml",
        "var/log/metald",
        "srv/jailer",
    ]:
        assert (dest / path).exists() or (dest / path).is_symlink(), path
    assert "d /run/netns" in (dest / "etc/tmpfiles.d/metald.conf").read_text()
    assert "net.ipv4.ip_forward = 1" in (dest / "etc/sysctl.d/99-metald.conf").read_text()
    assert "<port protocol=\"tcp\" port=\"9464\"/>" in (dest / "etc/firewalld/services/metald.xml").read_text()
    assert "rotate 30" in (dest / "etc/logrotate.d/metald").read_text()
    env = (dest / "etc/metald/metald.env").read_text()
    assert "UNKEY_METALD_JAILER_CHROOT_DIR" in env and "UNKEY_METALD_OTEL_PROMETHEUS_PORT" in env
    assert (dest / "usr/local/bin/metald").resolve(strict=False) == Path("/opt/metald/venv/bin/metald")
    # the installed program runs
    metald = dest / "opt/metald/venv/bin/metald"
    out = subprocess.run([str(metald), "config", "--json"], capture_output=True, text=True, timeout=60,
                         env={"METALD_ENV_FILE": str(dest / "etc/metald/metald.env"), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0 and '"port": 8080' in out.stdout, out.stderr
