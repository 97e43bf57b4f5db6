from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

IMAGE_DIR = Path(os.environ.get("UNKEY_METALD_IMAGE_DIR", ROOT / "build" / "image"))


def isolated() -> bool:
    """True inside tests/isolated.sh's private network and mount namespace."""
    return os.environ.get("METALD_ISOLATED") == "1" and os.geteuid() == 0


@pytest.fixture
def require_isolated() -> None:
    if not isolated():
        pytest.skip("needs root inside tests/isolated.sh (private network namespace)")


@pytest.fixture
def require_image() -> Path:
    if not (IMAGE_DIR / "vmlinuz").is_file() or not (IMAGE_DIR / "initramfs.cpio.gz").is_file():
        pytest.skip(f"guest image missing in {IMAGE_DIR}: run `make image`")
    return IMAGE_DIR


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every end-to-end test boots real guests: mark it `vm` so the suite runner
    puts it in the real-VM group (tests/run-suite.sh)."""
    for item in items:
        if "/tests/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.vm)


@pytest.fixture
def parts(tmp_path: Path):  # type: ignore[no-untyped-def]
    """(settings, store) for engine tests: a temporary data dir, networking on."""
    from metald.store.sqlite import Store
    from tests.support.server import make_settings

    settings = make_settings(tmp_path, network_enabled=True)
    store = Store(settings.db_path)
    yield settings, store
    store.close()
