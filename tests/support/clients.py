"""Three independent ways to call VmService: Connect JSON (plain HTTP with
httpx), Connect binary (the generated ConnectRPC client) and gRPC (grpcio)."""

from __future__ import annotations

from typing import Any

import grpc
import httpx
from connectrpc.errors import ConnectError
from google.protobuf import json_format

from metald.gen.metal.vmprovisioner.v1 import vm_pb2 as pb
from metald.gen.metal.vmprovisioner.v1 import vm_pb2_grpc
from metald.gen.metal.vmprovisioner.v1.vm_connect import VmServiceClientSync

SERVICE = "/metal.vmprovisioner.v1.VmService/"
_GRPC_CODES = {c: c.name.lower() for c in grpc.StatusCode}


class RpcFailed(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def _snake(method: str) -> str:
    out = ""
    for ch in method:
        out += ("_" + ch.lower()) if ch.isupper() and out else ch.lower()
    return out


class ConnectJsonClient:
    kind = "connect-json"

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=120)

    def call(self, method: str, request: Any) -> Any:
        body = json_format.MessageToJson(request)
        r = self.http.post(SERVICE + method, content=body, headers={"content-type": "application/json"})
        if r.status_code != 200:
            data = r.json()
            raise RpcFailed(data.get("code", str(r.status_code)), data.get("message", ""))
        response = getattr(pb, method + "Response")()
        json_format.Parse(r.text, response)
        return response

    def close(self) -> None:
        self.http.close()


class ConnectBinaryClient:
    kind = "connect-binary"

    def __init__(self, url: str) -> None:
        self.client = VmServiceClientSync(url, timeout_ms=120_000)

    def call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self.client, _snake(method))(request)
        except ConnectError as exc:
            raise RpcFailed(exc.code.value, exc.message) from None

    def close(self) -> None:
        self.client.close()


class GrpcClient:
    kind = "grpc"

    def __init__(self, url: str) -> None:
        target = url.removeprefix("http://")
        self.channel = grpc.insecure_channel(target)
        self.stub = vm_pb2_grpc.VmServiceStub(self.channel)

    def call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self.stub, method)(request, timeout=120)
        except grpc.RpcError as exc:
            raise RpcFailed(_GRPC_CODES.get(exc.code(), str(exc.code())), exc.details() or "") from None

    def close(self) -> None:
        self.channel.close()


CLIENTS = [ConnectJsonClient, ConnectBinaryClient, GrpcClient]


def small_config(**kw: Any) -> pb.VmConfig:
    config = pb.VmConfig(
        cpu=pb.CpuConfig(vcpu_count=kw.pop("vcpus", 1)),
        memory=pb.MemoryConfig(size_bytes=kw.pop("memory", 128 << 20)),
    )
    for key, value in kw.pop("metadata", {}).items():
        config.metadata[key] = value
    return config
