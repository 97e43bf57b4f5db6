"""Expected refusals, deadlines, cancellations and a SIGTERM with requests in flight
log one line each at info or warning: no traceback, nothing at error level."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import grpc
import httpx

from metald.gen.metal.vmprovisioner.v1 import vm_pb2 as pb
from metald.gen.metal.vmprovisioner.v1 import vm_pb2_grpc
from tests.support.clients import small_config
from tests.support.daemon import DaemonProcess
from tests.support.server import make_settings

SVC = "/metal.vmprovisioner.v1.VmService/"


def test_refusals_and_shutdown_log_clean_lines(tmp_path: Path) -> None:
    image = make_settings(tmp_path).image_dir
    daemon = DaemonProcess(tmp_path, image, UNKEY_METALD_NETWORK_ENABLED="false",
                           UNKEY_METALD_JAILER_ENABLED="false", UNKEY_METALD_SHUTDOWN_GRACE_SECONDS="2")
    daemon.start()
    try:
        url = daemon.url + SVC
        with grpc.insecure_channel(f"127.0.0.1:{daemon.port}") as channel:
            stub = vm_pb2_grpc.VmServiceStub(channel)
            for i in range(5):  # deadlines that expire while CreateVm runs, or before it starts
                try:
                    stub.CreateVm(pb.CreateVmRequest(vm_id=f"late-{i}", config=small_config()), timeout=0.002)
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            future = stub.CreateVm.future(pb.CreateVmRequest(vm_id="gone", config=small_config()), timeout=30)
            future.cancel()
            big = pb.CreateVmRequest(vm_id="big", config=small_config())
            big.config.metadata["blob"] = "x" * (3 << 20)
            try:
                stub.CreateVm(big, timeout=30)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        refusals = [
            httpx.post(url + "Nope", json={}),
            httpx.post(url + "ListVms", json={}, headers={"authorization": "Bearer forged"}),
            httpx.post(url + "ListVms", json={}, headers={"x-metald-caller": "spiffe://t/random"}),
            httpx.post(url + "ListVms", content=b"\0\0\0\0\0", headers={"content-type": "application/grpc"}),
            httpx.post(url + "ListVms", content=b"x" * (2 << 20), headers={"content-type": "application/json"}),
        ]
        assert [r.status_code for r in refusals] == [404, 401, 403, 200, 429]
        # requests in flight at SIGTERM: bodies that never finish arriving
        held = []
        for _ in range(4):
            s = socket.create_connection(("127.0.0.1", daemon.port))
            s.sendall(b"POST " + SVC.encode() + b"ListVms HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{")
            held.append(s)
        time.sleep(0.5)
        assert daemon.stop() == 0
        for s in held:
            s.close()
        text = daemon.log.read_text()
        assert "Traceback" not in text, text[-4000:]
        records = daemon.all_log_records()
        errors = [r for r in records if str(r.get("level", "")).lower() in ("error", "critical")]
        assert errors == [], errors
        messages = [str(r.get("message", r.get("msg", ""))) for r in records]
        assert not [m for m in messages if m.rstrip().endswith(":")], messages
        assert any("refused" in m for m in messages)
    finally:
        daemon.kill()
