"""Fixtures shared by the network tests (inside tests/isolated.sh)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from metald.config import Settings
from metald.network.manager import NetworkManager
from metald.store.sqlite import Store
from tests.integration.test_network_fakeguest import reset_host


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[NetworkManager]:
    """A NetworkManager with the host set up on its default settings; the host
    is reset before and after (host veths still being destroyed are waited for)."""
    reset_host()
    m = NetworkManager(Settings(data_dir=tmp_path), Store(tmp_path / "metald.db"))  # type: ignore[call-arg]
    await m.setup_host()
    yield m
    await m.settle(10)
    reset_host()
