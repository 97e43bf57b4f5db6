"""Property-based fuzzing of the API over all three protocols.

Generated and mutated requests (Connect JSON, Connect binary, gRPC): the
server never answers `internal`/`unknown`, never crashes, health stays green,
and the store holds exactly the VMs the accepted requests created.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metald.gen.metal.vmprovisioner.v1 import vm_pb2 as pb
from tests.support.clients import CLIENTS, RpcFailed
from tests.support.fakes import FakeBackend, FakeNetwork
from tests.support.server import RunningServer, make_settings, serve_in_thread

pytestmark = pytest.mark.xdist_group("fuzz")  # one worker: the model is shared across the tests

ALLOWED_CODES = {
    "invalid_argument",
    "not_found",
    "already_exists",
    "failed_precondition",
    "resource_exhausted",
    "permission_denied",
    "unavailable",
}
SVC = "/metal.vmprovisioner.v1.VmService/"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    with serve_in_thread(make_settings(tmp, network_enabled=True), FakeBackend(), FakeNetwork()) as srv:
        yield srv


@pytest.fixture(scope="module")
def clients(server: RunningServer):  # type: ignore[no-untyped-def]
    made = [c(server.url) for c in CLIENTS]
    yield made
    for c in made:
        c.close()


texts = st.one_of(
    st.text(max_size=80),
    st.sampled_from(["", "vm-1", "a" * 64, "a" * 65, "../../etc", "x\n", "vm_1", "-x", "ok-id"]),
)
ints32 = st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([0, 1, 2, 64, 65, -1]))
ints64 = st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([0, 128 << 20, 1 << 20, (128 << 20) + 1]))
maps = st.dictionaries(st.text(max_size=20), st.text(max_size=40), max_size=4)


@st.composite
def vm_configs(draw: st.DrawFn) -> pb.VmConfig:
    config = pb.VmConfig()
    if draw(st.booleans()):
        config.cpu.vcpu_count = draw(ints32)
        config.cpu.max_vcpu_count = draw(st.sampled_from([0, 0, 0, draw(ints32)]))
        if draw(st.integers(0, 9)) == 0:
            config.cpu.features.update(draw(maps))
    if draw(st.booleans()):
        config.memory.size_bytes = draw(ints64)
        config.memory.hotplug_enabled = draw(st.integers(0, 9)) == 0
    if draw(st.integers(0, 3)) == 0:
        config.boot.kernel_path = draw(st.sampled_from(["", "/etc/passwd", "/dev/null", "rel", "/nonexistent"]))
        config.boot.kernel_args = draw(texts)
    for _ in range(draw(st.integers(0, 2))):
        config.storage.add(id=draw(texts), path=draw(texts), read_only=draw(st.booleans()))
    for _ in range(draw(st.integers(0, 2))):
        nic = config.network.add(id=draw(texts), mac_address=draw(st.sampled_from(["", "02:00:00:00:00:09", "zz"])))
        nic.mode = draw(st.sampled_from([0, 1, 2, 3, 17]))
        if draw(st.booleans()):
            nic.ipv4_config.address = draw(st.sampled_from(["", "10.100.9.9", "1.2.3.4", "x"]))
        if draw(st.booleans()):
            nic.rx_rate_limit.bandwidth = draw(ints64)
            nic.rx_rate_limit.burst = draw(ints64)
    config.metadata.update(draw(maps))
    return config


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, object]:
    vm_id = draw(st.one_of(texts, st.sampled_from([f"fz-{i}" for i in range(8)])))
    method = draw(
        st.sampled_from(
            ["CreateVm", "CreateVm", "DeleteVm", "BootVm", "ShutdownVm", "PauseVm", "ResumeVm", "RebootVm",
             "GetVmInfo", "ListVms"]
        )
    )
    if method == "CreateVm":
        return method, pb.CreateVmRequest(vm_id=vm_id, config=draw(vm_configs()), customer_id=draw(texts))
    if method == "DeleteVm":
        return method, pb.DeleteVmRequest(vm_id=vm_id, force=draw(st.booleans()))
    if method == "ShutdownVm":
        return method, pb.ShutdownVmRequest(vm_id=vm_id, force=draw(st.booleans()), timeout_seconds=draw(ints32))
    if method == "RebootVm":
        return method, pb.RebootVmRequest(vm_id=vm_id, force=draw(st.booleans()))
    if method == "ListVms":
        return method, pb.ListVmsRequest(
            state_filter=draw(st.lists(st.integers(-3, 9), max_size=3)),
            page_size=draw(ints32),
            page_token=draw(texts),
        )
    return method, getattr(pb, method + "Request")(vm_id=vm_id)


class Model:
    """What the store must contain: the VMs that accepted requests created."""

    def __init__(self) -> None:
        self.vms: set[str] = set()

    def apply(self, method: str, request: object, response: object) -> None:
        if method == "CreateVm":
            self.vms.add(response.vm_id)  # type: ignore[attr-defined]
        elif method == "DeleteVm":
            self.vms.discard(request.vm_id)  # type: ignore[attr-defined]


MODEL = Model()


@settings(max_examples=900, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), req=requests())
def test_generated_requests(server: RunningServer, clients, data, req) -> None:  # type: ignore[no-untyped-def]
    method, request = req
    client = clients[data.draw(st.integers(0, 2))]
    try:
        response = client.call(method, request)
    except RpcFailed as exc:
        assert exc.code in ALLOWED_CODES, f"{client.kind} {method}: {exc}"
        return
    MODEL.apply(method, request, response)


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(req=requests(), seed=st.integers(0, 2**32 - 1), kind=st.sampled_from(["flip", "truncate", "json"]))
def test_mutated_bodies(server: RunningServer, req, seed: int, kind: str) -> None:  # type: ignore[no-untyped-def]
    method, request = req
    rng = random.Random(seed)
    if kind == "json":
        from google.protobuf import json_format

        doc = json.loads(json_format.MessageToJson(request) or "{}")
        keys = list(doc) or ["vmId"]
        doc[rng.choice(keys)] = rng.choice([None, 5, -1, "x" * 300, [], {}, True, 1e308, "\u0000"])
        if rng.random() < 0.3:
            doc["unknownField"] = 1
        body = json.dumps(doc).encode()
        content_type = "application/json"
    else:
        body = bytearray(request.SerializeToString())  # type: ignore[attr-defined]
        if kind == "flip" and body:
            for _ in range(rng.randint(1, 4)):
                body[rng.randrange(len(body))] = rng.randrange(256)
        elif body:
            del body[rng.randrange(len(body)):]
        body = bytes(body)
        content_type = "application/proto"
    r = httpx.post(server.url + SVC + method, content=body, headers={"content-type": content_type}, timeout=30)
    if r.status_code != 200:
        code = r.json()["code"]
        assert code in ALLOWED_CODES, (method, kind, r.text)
    elif method == "CreateVm":
        response = pb.CreateVmResponse()
        response.ParseFromString(r.content) if content_type == "application/proto" else None
        vm_id = response.vm_id if content_type == "application/proto" else r.json()["vmId"]
        MODEL.vms.add(vm_id)
    elif method == "DeleteVm":
        if content_type == "application/proto":
            parsed = pb.DeleteVmRequest()
            parsed.ParseFromString(body)
            MODEL.vms.discard(parsed.vm_id)
        else:
            MODEL.vms.discard(json.loads(body).get("vmId"))


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(req=requests(), seed=st.integers(0, 2**32 - 1))
def test_mutated_grpc_frames(server: RunningServer, req, seed: int) -> None:  # type: ignore[no-untyped-def]
    """Corrupt protobuf payloads sent through a real gRPC client."""
    method, request = req
    rng = random.Random(seed)
    body = bytearray(request.SerializeToString())  # type: ignore[attr-defined]
    for _ in range(rng.randint(1, 3)):
        if body:
            body[rng.randrange(len(body))] = rng.randrange(256)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = channel.unary_unary(SVC + method, request_serializer=None, response_deserializer=None)
        try:
            raw = call(bytes(body), timeout=30)
        except grpc.RpcError as exc:
            assert exc.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), exc
            return
    if method == "CreateVm":
        response = pb.CreateVmResponse()
        response.ParseFromString(raw)
        MODEL.vms.add(response.vm_id)
    elif method == "DeleteVm":
        parsed = pb.DeleteVmRequest()
        parsed.ParseFromString(bytes(body))
        MODEL.vms.discard(parsed.vm_id)


def test_store_matches_accepted_requests_and_health(server: RunningServer) -> None:
    """Runs after the fuzzers above (same module-scoped server)."""
    assert {row.vm_id for row in server.store.all_vms()} == MODEL.vms
    health = httpx.get(server.url + "/_/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
