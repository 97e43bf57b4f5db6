"""Every curl example in docs/api.md runs against a real server."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.fakes import FakeBackend, FakeNetwork
from tests.support.server import make_settings, serve_in_thread

DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def _blocks() -> list[str]:
    return re.findall(r"```sh\n(.*?)```", DOC.read_text(), re.S)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_every_curl_example_runs(tmp_path: Path) -> None:
    blocks = _blocks()
    assert len(blocks) >= 8
    with serve_in_thread(
        make_settings(tmp_path, network_enabled=True), FakeBackend(), FakeNetwork()
    ) as srv:
        script = "set -euo pipefail\n" + "\n".join(blocks)
        script = script.replace("http://127.0.0.1:8080", srv.url)
        result = subprocess.run(
            ["bash", "-c", script], capture_output=True, text=True, timeout=60, env=dict(os.environ)
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert '"vmId": "web-1"' in result.stdout or '"vmId":"web-1"' in result.stdout
        assert srv.store.get_vm("web-1") is None and srv.store.get_vm("web-2") is None
        # the EventService examples: Connect stream frames read with curl
        assert '0 {"event":{"sequence":"1",' in result.stdout
        assert '"kind":"EVENT_KIND_VM_REMOVED"' in result.stdout
        assert '0 {"heartbeat":{"sequence":' in result.stdout and "\n2 {}\n" in result.stdout
        assert '2 {"error": {"code": "not_found"' in result.stdout
