"""A lean asyncio client for VmService: the Connect protocol (unary, binary
protobuf) over one HTTP/1.1 keep-alive connection per client.

A load generator in Python spends most of its CPU in the HTTP client; this one
writes the request by hand and parses only the status line, the headers it
needs and the protobuf body, so that on a 2-core machine the daemon, not the
client, is what is measured.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, TypeVar

from google.protobuf.message import Message

SERVICE = "/metal.vmprovisioner.v1.VmService/"
M = TypeVar("M", bound=Message)


class RpcError(Exception):
    def __init__(self, code: str, message: str, status: int) -> None:
        super().__init__(f"{code}: {message} (HTTP {status})")
        self.code = code
        self.status = status


class Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self) -> Connection:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except (ConnectionError, OSError):
                pass
            self._writer = None

    async def call(self, method: str, request: Message, response: type[M]) -> M:
        if self._writer is None:
            await self.open()
        assert self._reader is not None and self._writer is not None
        body = request.SerializeToString()
        head = (
            f"POST {SERVICE}{method} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n"
            f"content-type: application/proto\r\nconnect-protocol-version: 1\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        )
        self._writer.write(head.encode() + body)
        try:
            status, headers = await self._read_head()
            data = await self._read_body(headers)
        except (asyncio.IncompleteReadError, ConnectionError):
            await self.close()
            raise
        if headers.get("connection") == "close":
            await self.close()
        if status != 200:
            try:
                err: dict[str, Any] = json.loads(data or b"{}")
            except ValueError:
                err = {"code": "unknown", "message": data[:200].decode(errors="replace")}
            raise RpcError(str(err.get("code", status)), str(err.get("message", "")), status)
        out = response()
        out.ParseFromString(data)
        return out

    async def _read_head(self) -> tuple[int, dict[str, str]]:
        assert self._reader is not None
        line = await self._reader.readuntil(b"\r\n\r\n")
        lines = line.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for raw in lines[1:]:
            if ":" in raw:
                key, value = raw.split(":", 1)
                headers[key.strip().lower()] = value.strip().lower() if key.lower() == "connection" else value.strip()
        return status, headers

    async def _read_body(self, headers: dict[str, str]) -> bytes:
        assert self._reader is not None
        if "content-length" in headers:
            return await self._reader.readexactly(int(headers["content-length"]))
        if headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await self._reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
                if size == 0:
                    await self._reader.readuntil(b"\r\n")
                    return b"".join(parts)
                parts.append(await self._reader.readexactly(size))
                await self._reader.readexactly(2)
        return await self._reader.read()
