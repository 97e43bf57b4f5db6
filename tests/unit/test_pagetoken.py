"""ListVms page tokens are authenticated: forged, edited or foreign tokens are invalid_argument."""

from __future__ import annotations

import base64
import json
import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from metald.api.pagetoken import PageTokens, load_key
from metald.core.errors import InvalidArgument
from tests.support.fakes import FakeBackend, FakeNetwork
from tests.support.server import RunningServer, make_settings, serve_in_thread

SVC = "/metal.vmprovisioner.v1.VmService/"
CONFIG = {"cpu": {"vcpuCount": 1}, "memory": {"sizeBytes": str(128 << 20)}}


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def test_round_trip_and_binding() -> None:
    tokens = PageTokens(b"k" * 32)
    token = tokens.encode(42, [2], "*")
    assert tokens.decode(token, [2], "*") == 42
    assert tokens.decode("", [2], "*") == 0
    for states, scope in (([3], "*"), ([2], "acme"), ([], "*")):
        with pytest.raises(InvalidArgument):
            tokens.decode(token, states, scope)
    with pytest.raises(InvalidArgument):
        PageTokens(b"x" * 32).decode(token, [2], "*")  # another host's key
    raw = bytearray(base64.urlsafe_b64decode(token + "=="))
    raw[7] ^= 1  # the position edited
    with pytest.raises(InvalidArgument):
        tokens.decode(_b64(bytes(raw)), [2], "*")


@pytest.mark.parametrize(
    "token",
    [
        _b64(json.dumps({"a": 2**70, "f": "x"}).encode()),  # the old unsigned format, absurd position
        _b64(json.dumps({"a": 1.9, "f": "x"}).encode()),
        _b64(json.dumps({"a": True, "f": "x"}).encode()),
        _b64(b"\xff" * 24),
        "!!!!",
        "a" * 10_000,
        "\u00e9\u00e9",
    ],
)
def test_forged_tokens_are_invalid(token: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        PageTokens(b"k" * 32).decode(token, [], "*")
    assert info.value.args and "page_token" in str(info.value)


def test_key_is_made_once_private(tmp_path: Path) -> None:
    key = load_key(tmp_path / "data")
    assert len(key) == 32 and load_key(tmp_path / "data") == key
    assert stat.S_IMODE((tmp_path / "data" / "page-token.key").stat().st_mode) == 0o600


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    with serve_in_thread(make_settings(tmp_path, network_enabled=True), FakeBackend(), FakeNetwork()) as srv:
        yield srv


def test_forged_token_through_the_api(server: RunningServer) -> None:
    for i in range(3):
        httpx.post(server.url + SVC + "CreateVm", json={"vmId": f"p-{i}", "config": CONFIG}).raise_for_status()
    first = httpx.post(server.url + SVC + "ListVms", json={"pageSize": 1}).json()
    second = httpx.post(server.url + SVC + "ListVms", json={"pageSize": 1, "pageToken": first["nextPageToken"]})
    assert [v["vmId"] for v in second.json()["vms"]] == ["p-1"]
    forged = _b64(json.dumps({"a": 2**70, "f": "x"}).encode())
    r = httpx.post(server.url + SVC + "ListVms", json={"pageSize": 1, "pageToken": forged})
    assert r.status_code == 400 and r.json()["code"] == "invalid_argument" and "page_token" in r.json()["message"]


def test_nul_in_metadata_value_is_refused(server: RunningServer) -> None:
    config = {**CONFIG, "metadata": {"team": "a\u0000b"}}
    r = httpx.post(server.url + SVC + "CreateVm", json={"vmId": "nul-1", "config": config})
    assert r.status_code == 400 and r.json()["code"] == "invalid_argument"
    assert r.json()["message"].startswith("config.metadata.team")
    assert server.store.get_vm("nul-1") is None
