"""The root deployment guide's own troubleshooting commands show metald's setup."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from metald.config import Settings
from metald.network import host
from metald.network.manager import NetworkManager
from metald.store.sqlite import Store

pytestmark = pytest.mark.usefixtures("require_isolated")


def _run(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


async def test_guide_commands(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, run_dir=tmp_path / "run")
    store = Store(settings.db_path)
    manager = NetworkManager(settings, store)
    await manager.setup_host()
    await manager.setup_host()  # idempotent: one rule, not two
    try:
        assert "br-vms" in _run("ip", "link", "show", "br-vms")
        assert _run("sysctl", "-n", "net.ipv4.ip_forward").strip() == "1"
        nat = _run("iptables", "-t", "nat", "-L", "POSTROUTING", "-n", "-v")
        lines = [line for line in nat.splitlines() if "10.100.0.0" in line]
        # the masquerade, and before it the exemption of the extra bridges' bridged frames
        assert len(lines) == 2 and "RETURN" in lines[0] and "br-vms-+" in lines[0], nat
        assert "MASQUERADE" in lines[1] and "!br-vms" in lines[1].replace(" ", ""), nat
        assert "masquerade" in _run("nft", "list", "table", "inet", "metald")
    finally:
        await host.teardown(settings)
        store.close()
    assert "10.100.0.0" not in _run("iptables", "-t", "nat", "-L", "POSTROUTING", "-n")
