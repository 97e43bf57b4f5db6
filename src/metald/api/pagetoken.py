"""ListVms page tokens: the position, authenticated with HMAC-SHA256 under a per-host key.

A token is base64url(position as 8 bytes || first 16 bytes of HMAC(key, position || filter)),
where the filter is the request's state_filter and the caller's customer scope. A token
is valid only with the filter and on the host it was made for; anything else (edited,
truncated, forged, from another filter) is ``invalid_argument``, never a crash.
The key is 32 random bytes in ``<data_dir>/page-token.key`` (0600), made on first use.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import struct
from pathlib import Path

from metald.core.errors import InvalidArgument

KEY_FILE = "page-token.key"
KEY_BYTES = 32
_MAC_BYTES = 16
_POSITION = struct.Struct(">Q")
_TOKEN_BYTES = _POSITION.size + _MAC_BYTES
MAX_POSITION = (1 << 63) - 1  # SQLite's INTEGER


def load_key(data_dir: Path) -> bytes:
    """The host's page-token key, created (atomically, 0600) if missing or unusable."""
    path = data_dir / KEY_FILE
    try:
        key = path.read_bytes()
        if len(key) == KEY_BYTES:
            return key
    except FileNotFoundError:
        pass
    key = secrets.token_bytes(KEY_BYTES)
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return key


class PageTokens:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def _mac(self, position: int, states: list[int], scope: str) -> bytes:
        message = _POSITION.pack(position) + json.dumps([sorted(states), scope]).encode()
        return hmac.new(self._key, message, hashlib.sha256).digest()[:_MAC_BYTES]

    def encode(self, position: int, states: list[int], scope: str) -> str:
        if not 0 <= position <= MAX_POSITION:
            raise ValueError(f"page position {position} out of range")
        raw = _POSITION.pack(position) + self._mac(position, states, scope)
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    def decode(self, token: str, states: list[int], scope: str) -> int:
        """The position after which the next page starts (0: first page)."""
        if not token:
            return 0
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)) if len(token) <= 64 else b""
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != _TOKEN_BYTES:
            raise InvalidArgument("page_token", "is not a token returned by ListVms")
        (position,) = _POSITION.unpack(raw[: _POSITION.size])
        mac = self._mac(position, states, scope)
        if position > MAX_POSITION or not hmac.compare_digest(raw[_POSITION.size :], mac):
            raise InvalidArgument(
                "page_token", "is not a token returned by ListVms on this host for this state_filter"
            )
        return position
