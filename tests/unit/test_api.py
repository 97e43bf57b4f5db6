"""VmService over real HTTP (Connect JSON, Connect binary, gRPC) with a fake VMM.

The engine, store, validation and server are the real ones; only the VMM is
faked here (real VMMs are exercised in tests/e2e).
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from metald.gen.metal.vmprovisioner.v1 import vm_pb2 as pb
from tests.support.clients import CLIENTS, RpcFailed, small_config
from tests.support.fakes import FakeBackend, FakeNetwork
from tests.support.server import RunningServer, make_settings, serve_in_thread

S = pb  # enum values live on the module


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    settings = make_settings(tmp_path, network_enabled=True)
    with serve_in_thread(settings, FakeBackend(), FakeNetwork()) as srv:
        yield srv


@pytest.fixture(params=CLIENTS, ids=lambda c: c.kind)
def client(request: pytest.FixtureRequest, server: RunningServer):  # type: ignore[no-untyped-def]
    c = request.param(server.url)
    yield c
    c.close()


def create(client, vm_id: str = "", **kw):  # type: ignore[no-untyped-def]
    customer = kw.pop("customer", "")
    return client.call(
        "CreateVm", pb.CreateVmRequest(vm_id=vm_id, config=small_config(**kw), customer_id=customer)
    )


def expect(code: str, fn, *args, contains: str = ""):  # type: ignore[no-untyped-def]
    with pytest.raises(RpcFailed) as info:
        fn(*args)
    assert info.value.code == code, info.value
    assert contains in info.value.message, info.value.message
    return info.value


# --- every RPC through every protocol -----------------------------------------
def test_every_rpc(client, server: RunningServer) -> None:  # type: ignore[no-untyped-def]
    r = create(client, "vm-a", customer="cust-1", metadata={"team": "x"})
    assert (r.vm_id, r.state) == ("vm-a", S.VM_STATE_CREATED)
    assert client.call("BootVm", pb.BootVmRequest(vm_id="vm-a")).state == S.VM_STATE_RUNNING
    assert client.call("PauseVm", pb.PauseVmRequest(vm_id="vm-a")).state == S.VM_STATE_PAUSED
    assert client.call("ResumeVm", pb.ResumeVmRequest(vm_id="vm-a")).state == S.VM_STATE_RUNNING
    r = client.call("RebootVm", pb.RebootVmRequest(vm_id="vm-a"))
    assert r.success and r.state == S.VM_STATE_RUNNING
    info = client.call("GetVmInfo", pb.GetVmInfoRequest(vm_id="vm-a"))
    assert info.vm_id == "vm-a" and info.state == S.VM_STATE_RUNNING
    assert info.config.memory.size_bytes == 128 << 20 and info.config.metadata["team"] == "x"
    assert info.backend_info["metrics_measured"] == "true"
    assert info.metrics.memory_usage_bytes == 4096
    assert info.network_info.network_namespace == "fc-vm-a"
    assert info.network_info.ip_address.startswith("10.100.0.")
    assert info.metrics.network_stats.bytes_transmitted == 20
    listed = client.call("ListVms", pb.ListVmsRequest())
    assert [v.vm_id for v in listed.vms] == ["vm-a"] and listed.total_count == 1
    assert listed.vms[0].customer_id == "cust-1" and listed.vms[0].metadata["team"] == "x"
    r = client.call("ShutdownVm", pb.ShutdownVmRequest(vm_id="vm-a", timeout_seconds=5))
    assert r.state == S.VM_STATE_SHUTDOWN
    info = client.call("GetVmInfo", pb.GetVmInfoRequest(vm_id="vm-a"))
    assert info.backend_info["metrics_measured"] == "false"
    assert "not measured" in info.backend_info["metrics"]
    assert info.backend_info["last_exit_reason"] == "guest poweroff"
    assert client.call("DeleteVm", pb.DeleteVmRequest(vm_id="vm-a")).success
    expect("not_found", client.call, "GetVmInfo", pb.GetVmInfoRequest(vm_id="vm-a"))
    assert [op for op, _ in server.backend.calls] == [
        "boot", "pause", "resume", "reboot", "shutdown", "cleanup"
    ]


def test_generated_id_and_duplicates(client) -> None:  # type: ignore[no-untyped-def]
    first = create(client)
    assert first.vm_id.startswith("vm-") and len(first.vm_id) <= 64
    assert create(client).vm_id != first.vm_id
    create(client, "dup-1")
    expect("already_exists", create, client, "dup-1")


# --- state machine -------------------------------------------------------------
OPS = {
    "boot": lambda c, v: c.call("BootVm", pb.BootVmRequest(vm_id=v)),
    "pause": lambda c, v: c.call("PauseVm", pb.PauseVmRequest(vm_id=v)),
    "resume": lambda c, v: c.call("ResumeVm", pb.ResumeVmRequest(vm_id=v)),
    "shutdown": lambda c, v: c.call("ShutdownVm", pb.ShutdownVmRequest(vm_id=v)),
    "reboot": lambda c, v: c.call("RebootVm", pb.RebootVmRequest(vm_id=v)),
    "delete": lambda c, v: c.call("DeleteVm", pb.DeleteVmRequest(vm_id=v)),
}
# state -> op -> resulting state (None: deleted); anything absent is illegal
LEGAL = {
    "CREATED": {"boot": "RUNNING", "delete": None},
    "RUNNING": {"pause": "PAUSED", "shutdown": "SHUTDOWN", "reboot": "RUNNING"},
    "PAUSED": {"resume": "RUNNING", "shutdown": "SHUTDOWN"},
    "SHUTDOWN": {"boot": "RUNNING", "delete": None},
}
REACH = {
    "CREATED": [],
    "RUNNING": ["boot"],
    "PAUSED": ["boot", "pause"],
    "SHUTDOWN": ["boot", "shutdown"],
}


@pytest.mark.parametrize("state", list(LEGAL))
@pytest.mark.parametrize("op", list(OPS))
def test_state_machine(server: RunningServer, state: str, op: str) -> None:
    client = CLIENTS[0](server.url)
    vm = f"sm-{state.lower()}-{op}"
    create(client, vm)
    for step in REACH[state]:
        OPS[step](client, vm)
    if op in LEGAL[state]:
        OPS[op](client, vm)
        after = LEGAL[state][op]
        if after is None:
            expect("not_found", client.call, "GetVmInfo", pb.GetVmInfoRequest(vm_id=vm))
        else:
            got = client.call("GetVmInfo", pb.GetVmInfoRequest(vm_id=vm)).state
            assert pb.VmState.Name(got) == f"VM_STATE_{after}"
            # persisted, not just returned
            assert server.store.get_vm(vm).state == pb.VmState.Value(f"VM_STATE_{after}")
    else:
        err = expect("failed_precondition", OPS[op], client, vm)
        assert state in err.message  # names the current state
        got = client.call("GetVmInfo", pb.GetVmInfoRequest(vm_id=vm)).state
        assert pb.VmState.Name(got) == f"VM_STATE_{state}"


def test_force_delete_of_running_vm(server: RunningServer) -> None:
    client = CLIENTS[0](server.url)
    create(client, "fd-1")
    OPS["boot"](client, "fd-1")
    assert client.call("DeleteVm", pb.DeleteVmRequest(vm_id="fd-1", force=True)).success
    assert not server.backend.is_running("fd-1")
    assert server.store.get_vm("fd-1") is None


def test_vmm_exit_is_recorded_as_shutdown(server: RunningServer) -> None:
    client = CLIENTS[0](server.url)
    create(client, "crash-1")
    OPS["boot"](client, "crash-1")
    server.loop.call_soon_threadsafe(server.backend.crash, "crash-1", "killed by signal SIGKILL")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        info = client.call("GetVmInfo", pb.GetVmInfoRequest(vm_id="crash-1"))
        if info.state == S.VM_STATE_SHUTDOWN:
            break
        time.sleep(0.05)
    assert info.state == S.VM_STATE_SHUTDOWN
    assert info.backend_info["last_exit_reason"] == "killed by signal SIGKILL"
    events = server.store.events("crash-1")
    assert events[0]["operation"] == "vmm-exit"


def test_backend_failure_rolls_back_boot(server: RunningServer) -> None:
    client = CLIENTS[0](server.url)
    create(client, "bf-1")
    server.backend.fail.add("boot")
    expect("unavailable", OPS["boot"], client, "bf-1", contains="fake boot failure")
    assert client.call("GetVmInfo", pb.GetVmInfoRequest(vm_id="bf-1")).state == S.VM_STATE_CREATED
    assert server.store.intents() == []


# --- listing -----------------------------------------------------------------
def test_pagination_with_filter(client, server: RunningServer) -> None:  # type: ignore[no-untyped-def]
    for i in range(23):
        create(client, f"pg-{i:02d}")
        if i % 3 == 0:
            OPS["boot"](client, f"pg-{i:02d}")
    running = [f"pg-{i:02d}" for i in range(23) if i % 3 == 0]
    seen, token, pages = [], "", 0
    while True:
        r = client.call(
            "ListVms",
            pb.ListVmsRequest(state_filter=[S.VM_STATE_RUNNING], page_size=3, page_token=token),
        )
        assert r.total_count == len(running)
        assert len(r.vms) <= 3
        seen += [v.vm_id for v in r.vms]
        pages += 1
        token = r.next_page_token
        if not token:
            break
    assert seen == running and pages == 3
    everything = client.call("ListVms", pb.ListVmsRequest(page_size=1000))
    assert [v.vm_id for v in everything.vms] == [f"pg-{i:02d}" for i in range(23)]
    two = client.call(
        "ListVms",
        pb.ListVmsRequest(state_filter=[S.VM_STATE_RUNNING, S.VM_STATE_CREATED], page_size=100),
    )
    assert two.total_count == 23
    # a token from one filter is refused for another
    first = client.call("ListVms", pb.ListVmsRequest(page_size=2))
    expect(
        "invalid_argument",
        client.call,
        "ListVms",
        pb.ListVmsRequest(state_filter=[S.VM_STATE_RUNNING], page_token=first.next_page_token),
        contains="page_token",
    )


def test_default_page_size(server: RunningServer) -> None:
    client = CLIENTS[1](server.url)
    for i in range(55):
        create(client, f"dp-{i}")
    r = client.call("ListVms", pb.ListVmsRequest())
    assert len(r.vms) == 50 and r.total_count == 55 and r.next_page_token


def test_concurrent_creates(server: RunningServer) -> None:
    clients = [c(server.url) for c in CLIENTS]

    def one(i: int) -> str:
        return create(clients[i % 3], f"cc-{i}").vm_id

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(one, range(50)))
    assert sorted(ids) == sorted(f"cc-{i}" for i in range(50))
    assert server.call(_count(server)) == 50


async def _acount(server: RunningServer) -> int:
    return len(server.store.all_vms())


def _count(server: RunningServer):  # type: ignore[no-untyped-def]
    return _acount(server)


# --- validation ---------------------------------------------------------------
def _req(**kw) -> pb.CreateVmRequest:  # type: ignore[no-untyped-def]
    req = pb.CreateVmRequest(vm_id=kw.pop("vm_id", "val-1"), config=small_config())
    mutate = kw.pop("mutate", None)
    if mutate:
        mutate(req)
    return req


BAD_CREATES = {
    "vm_id": lambda r: setattr(r, "vm_id", "bad id!"),
    "vm_id ": lambda r: setattr(r, "vm_id", "x" * 65),
    "customer_id": lambda r: setattr(r, "customer_id", "a b"),
    "config.cpu.vcpu_count": lambda r: r.config.cpu.__setattr__("vcpu_count", 0),
    "config.cpu.vcpu_count ": lambda r: r.config.cpu.__setattr__("vcpu_count", -2),
    "config.cpu.max_vcpu_count": lambda r: r.config.cpu.__setattr__("max_vcpu_count", 4),
    "config.cpu.topology": lambda r: r.config.cpu.topology.__setattr__("sockets", 3),
    "config.cpu.features": lambda r: r.config.cpu.features.__setitem__("avx", "on"),
    "config.memory.size_bytes": lambda r: r.config.memory.__setattr__("size_bytes", -1),
    "config.memory.size_bytes  ": lambda r: r.config.memory.__setattr__("size_bytes", 1 << 50),
    "config.memory.size_bytes   ": lambda r: r.config.memory.__setattr__("size_bytes", (128 << 20) + 1),
    "config.memory.hotplug_enabled": lambda r: r.config.memory.__setattr__("hotplug_enabled", True),
    "config.memory.max_size_bytes": lambda r: r.config.memory.__setattr__("max_size_bytes", 1 << 30),
    "config.memory.backing": lambda r: r.config.memory.backing.__setitem__("hugepages", "1"),
    "config.boot.kernel_path": lambda r: r.config.boot.__setattr__("kernel_path", "/etc/passwd"),
    "config.boot.kernel_path ": lambda r: r.config.boot.__setattr__("kernel_path", "relative"),
    "config.boot.kernel_args": lambda r: r.config.boot.__setattr__("kernel_args", "a\nb"),
    "config.boot.boot_options": lambda r: r.config.boot.boot_options.__setitem__("x", "y"),
    "config.storage[0].path": lambda r: r.config.storage.add(id="d0", path="/nonexistent"),
    "config.storage[0].id": lambda r: r.config.storage.add(id="bad id", path="/x"),
    "config.network[0].mac_address": lambda r: r.config.network.add(mac_address="zz:00"),
    "config.network[0].mac_address ": lambda r: r.config.network.add(mac_address="01:00:00:00:00:01"),
    "config.network[0].tap_device": lambda r: r.config.network.add(tap_device="x" * 16),
    "config.network[0].mode": lambda r: r.config.network.add(mode=3),
    "config.network[0].ipv6_config": lambda r: r.config.network.add().ipv6_config.__setattr__(
        "address", "fd00::5"
    ),
    "config.network[0].ipv4_config.address": lambda r: r.config.network.add().ipv4_config.__setattr__(
        "address", "not-an-ip"
    ),
    "config.network[0].rx_rate_limit.bandwidth": lambda r: r.config.network.add().rx_rate_limit.__setattr__(
        "bandwidth", -5
    ),
    "config.network": lambda r: [r.config.network.add(), r.config.network.add()],
    "config.console.output": lambda r: r.config.console.__setattr__("output", "/tmp/x"),
    "config.metadata": lambda r: [r.config.metadata.__setitem__(f"k{i}", "v") for i in range(65)],
}


@pytest.mark.parametrize("field", list(BAD_CREATES))
def test_create_validation(server: RunningServer, field: str) -> None:
    client = CLIENTS[0](server.url)
    err = expect("invalid_argument", client.call, "CreateVm", _req(mutate=BAD_CREATES[field]))
    assert err.message.startswith(field.strip()), err.message
    assert server.store.all_vms() == [], "nothing may be written on invalid input"
    assert httpx.get(server.url + "/_/health").json()["status"] == "ok"


def test_missing_config(server: RunningServer) -> None:
    client = CLIENTS[2](server.url)
    expect("invalid_argument", client.call, "CreateVm", pb.CreateVmRequest(vm_id="x"), contains="config")


@pytest.mark.parametrize(
    "method,request_,field",
    [
        ("BootVm", pb.BootVmRequest(vm_id=""), "vm_id"),
        ("PauseVm", pb.PauseVmRequest(vm_id="../etc"), "vm_id"),
        ("ShutdownVm", pb.ShutdownVmRequest(vm_id="a", timeout_seconds=-1), "timeout_seconds"),
        ("ListVms", pb.ListVmsRequest(page_size=-1), "page_size"),
        ("ListVms", pb.ListVmsRequest(page_size=5000), "page_size"),
        ("ListVms", pb.ListVmsRequest(state_filter=[9]), "state_filter[0]"),
        ("ListVms", pb.ListVmsRequest(state_filter=[0]), "state_filter[0]"),
        ("ListVms", pb.ListVmsRequest(page_token="garbage!"), "page_token"),
    ],
)
def test_other_validation(client, method: str, request_, field: str) -> None:  # type: ignore[no-untyped-def]
    err = expect("invalid_argument", client.call, method, request_)
    assert err.message.startswith(field)


def test_malformed_and_oversized_bodies(server: RunningServer) -> None:
    url = server.url + "/metal.vmprovisioner.v1.VmService/CreateVm"
    r = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["code"] == "invalid_argument"
    r = httpx.post(
        url, content=b'{"vmId": 5, "bogusField": 1}', headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["code"] == "invalid_argument"
    r = httpx.post(url, content=b"\xff\x00garbage", headers={"content-type": "application/proto"})
    assert r.status_code == 400 and r.json()["code"] == "invalid_argument"
    big = b'{"vmId":"' + b"a" * (2 << 20) + b'"}'
    r = httpx.post(url, content=big, headers={"content-type": "application/json"})
    assert r.status_code == 429 and r.json()["code"] == "resource_exhausted"
    assert "request body" in r.json()["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the same answer
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    r = httpx.post(url, content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 429 and r.json()["code"] == "resource_exhausted"
    assert server.store.all_vms() == []
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_health(server: RunningServer) -> None:
    for path in ("/_/health", "/health"):
        body = httpx.get(server.url + path).json()
        assert body["service"] == "metald" and body["status"] == "ok"
        assert {"version", "uptime_seconds", "checks"} <= body.keys()
        assert body["checks"]["backend"]["ok"] is True


def test_health_503_when_component_down(tmp_path: Path) -> None:
    backend = FakeBackend()

    async def broken() -> tuple[bool, str]:
        return False, "qemu binary missing"

    backend.ping = broken  # type: ignore[method-assign]
    with serve_in_thread(make_settings(tmp_path), backend) as srv:
        r = httpx.get(srv.url + "/_/health")
        assert r.status_code == 503
        assert r.json()["checks"]["backend"] == {"ok": False, "detail": "qemu binary missing"}


def test_restart_keeps_state(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    backend = FakeBackend()
    with serve_in_thread(settings, backend) as srv:
        client = CLIENTS[1](srv.url)
        create(client, "keep-1", customer="c1")
        create(client, "keep-2")
        OPS["boot"](client, "keep-2")
        OPS["boot"](client, "keep-1")
        OPS["shutdown"](client, "keep-1")
    backend.adoptable = {"keep-2"}
    with serve_in_thread(settings, backend) as srv:
        client = CLIENTS[2](srv.url)
        vms = {v.vm_id: v for v in client.call("ListVms", pb.ListVmsRequest()).vms}
        assert vms["keep-1"].state == S.VM_STATE_SHUTDOWN and vms["keep-1"].customer_id == "c1"
        assert vms["keep-2"].state == S.VM_STATE_RUNNING
        assert ("adopt", "keep-2") in backend.calls


def test_oversized_grpc_request(server: RunningServer) -> None:
    import grpc

    from metald.gen.metal.vmprovisioner.v1 import vm_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = vm_pb2_grpc.VmServiceStub(channel)
        request = pb.CreateVmRequest(vm_id="big", config=small_config())
        request.config.metadata["blob"] = "x" * (2 << 20)
        with pytest.raises(grpc.RpcError) as info:
            stub.CreateVm(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert server.store.get_vm("big") is None
