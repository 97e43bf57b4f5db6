"""The Firecracker test double refuses what the API description and Firecracker refuse."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.firecracker_double import firecracker_double as fcd
from tests.firecracker_double import harness


@pytest.fixture(autouse=True)
def no_host_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests run without root: no /dev/kvm or TAP (both checks are on by default)."""
    monkeypatch.setenv("FC_DOUBLE_CHECK_KVM", "0")
    monkeypatch.setenv("FC_DOUBLE_CHECK_TAP", "0")


@pytest.fixture(scope="module")
def validator() -> fcd.SpecValidator:
    return harness.validator()


def check(validator: fcd.SpecValidator, method: str, path: str, body: Any) -> str | None:
    raw = json.dumps(body).encode() if body is not None else None
    try:
        validator.check(method, path, raw)
    except fcd.Fault as fault:
        return fault.message
    return None


def test_spec_is_the_official_one(validator: fcd.SpecValidator) -> None:
    assert validator.version == "1.16.1"
    assert {(r.method, r.template) for r in validator.routes} >= {
        ("PUT", "/logger"),
        ("PUT", "/drives/{drive_id}"),
        ("PATCH", "/vm"),
        ("GET", "/"),
    }


def test_every_object_schema_denies_unknown_fields(validator: fcd.SpecValidator) -> None:
    def objects(node: Any) -> list[dict]:
        found = []
        if isinstance(node, dict):
            if node.get("type") == "object":
                found.append(node)
            for value in node.values():
                found += objects(value)
        return found

    all_objects = objects(validator.definitions)
    assert all_objects
    for obj in all_objects:  # explicit everywhere: False unless the spec says otherwise
        assert "additionalProperties" in obj, obj
    assert validator.definitions["Drive"]["additionalProperties"] is False
    assert validator.definitions["MmdsContentsObject"]["additionalProperties"] is True


def test_valid_bodies_pass(validator: fcd.SpecValidator) -> None:
    assert check(validator, "PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 256}) is None
    body = {"drive_id": "rootfs", "path_on_host": "/x", "is_root_device": True, "is_read_only": False}
    assert check(validator, "PUT", "/drives/rootfs", body) is None
    assert check(validator, "PATCH", "/vm", {"state": "Paused"}) is None


def test_unknown_field_is_rejected_by_name(validator: fcd.SpecValidator) -> None:
    msg = check(validator, "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128, "cpus": 2})
    assert msg is not None
    assert msg.startswith("An error occurred when deserializing the json body of a request:")
    assert "'cpus' was unexpected" in msg


def test_unknown_field_in_a_nested_rate_limiter(validator: fcd.SpecValidator) -> None:
    body = {
        "iface_id": "eth0",
        "host_dev_name": "tap0",
        "rx_rate_limiter": {"bandwidth": {"size": 1, "refill_time": 1, "burst": 5}},
    }
    msg = check(validator, "PUT", "/network-interfaces/eth0", body)
    assert msg is not None and "'burst' was unexpected" in msg and "rx_rate_limiter/bandwidth" in msg


def test_missing_required_field(validator: fcd.SpecValidator) -> None:
    msg = check(validator, "PUT", "/boot-source", {"boot_args": "console=ttyS0"})
    assert msg is not None and "'kernel_image_path' is a required property" in msg


def test_wrong_types_and_bounds(validator: fcd.SpecValidator) -> None:
    msg = check(validator, "PUT", "/machine-config", {"vcpu_count": "2", "mem_size_mib": 128})
    assert msg is not None and "'2' is not of type 'integer'" in msg
    msg = check(validator, "PUT", "/machine-config", {"vcpu_count": 64, "mem_size_mib": 128})
    assert msg is not None and "64 is greater than the maximum of 32" in msg
    msg = check(validator, "PUT", "/machine-config", {"vcpu_count": True, "mem_size_mib": 128})
    assert msg is not None and "not of type 'integer'" in msg
    bucket = {"bandwidth": {"size": -1, "refill_time": 100}}
    body = {"iface_id": "eth0", "host_dev_name": "tap0", "tx_rate_limiter": bucket}
    msg = check(validator, "PUT", "/network-interfaces/eth0", body)
    assert msg is not None and "-1 is less than the minimum of 0" in msg
    msg = check(validator, "PATCH", "/vm", {"state": "Stopped"})
    assert msg is not None and "'Stopped' is not one of ['Paused', 'Resumed']" in msg
    msg = check(validator, "PUT", "/actions", {"action_type": "Reboot"})
    assert msg is not None and "is not one of" in msg


def test_paths_methods_ids_and_empty_bodies(validator: fcd.SpecValidator) -> None:
    assert check(validator, "GET", "/nope", None) == "Invalid request method and/or path: GET /nope."
    assert check(validator, "DELETE", "/vm", None) == "Invalid request method and/or path: DELETE /vm."
    assert check(validator, "PUT", "/logger", None) == "Empty PUT request."
    assert check(validator, "GET", "/", {"a": 1}) == "GET request cannot have a body."
    body = {"drive_id": "other", "is_root_device": False, "path_on_host": "/x", "is_read_only": True}
    assert check(validator, "PUT", "/drives/root", body) == (
        "The id from the path does not match the id from the body!"
    )
    body = {"drive_id": "root-fs", "is_root_device": False, "path_on_host": "/x", "is_read_only": True}
    assert check(validator, "PUT", "/drives/root-fs", body) == (
        "API Resource IDs can only contain alphanumeric characters and underscores."
    )
    with pytest.raises(fcd.Fault, match="deserializing"):
        validator.check("PUT", "/logger", b"{not json")


# --- Firecracker's state rules, through the App (no socket) -----------------------------


class Exited(Exception):
    pass


def make_app(validator: fcd.SpecValidator, tmp_path: Path) -> fcd.App:
    def exit_process(code: int) -> None:
        raise Exited(code)

    vmm = fcd.Vmm("vm-1", validator.version, exit_process)
    return fcd.App(validator, vmm, tmp_path / "record.jsonl")


def call(app: fcd.App, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    return app.request(method, path, json.dumps(body).encode() if body is not None else None)


def fault(app: fcd.App, method: str, path: str, body: Any = None) -> str:
    status, payload = call(app, method, path, body)
    assert status == 400, payload
    return payload["fault_message"]


def test_state_rules(validator: fcd.SpecValidator, tmp_path: Path) -> None:
    app = make_app(validator, tmp_path)
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"k")
    metrics = tmp_path / "metrics"

    assert fault(app, "PATCH", "/vm", {"state": "Paused"}) == fcd.NOT_BEFORE_BOOT
    assert fault(app, "PUT", "/actions", {"action_type": "FlushMetrics"}) == fcd.NOT_BEFORE_BOOT
    assert fault(app, "PUT", "/actions", {"action_type": "SendCtrlAltDel"}) == fcd.NOT_BEFORE_BOOT
    assert fault(app, "PUT", "/actions", {"action_type": "InstanceStart"}) == (
        "Start microvm error: Cannot start microvm without kernel configuration."
    )
    # Firecracker opens (never creates) the metrics file and the kernel.
    assert "No such file or directory" in fault(app, "PUT", "/metrics", {"metrics_path": str(metrics)})
    metrics.write_bytes(b"")
    assert call(app, "PUT", "/metrics", {"metrics_path": str(metrics)})[0] == 204
    assert "Reinitialization" in fault(app, "PUT", "/metrics", {"metrics_path": str(metrics)})
    missing = {"kernel_image_path": str(tmp_path / "missing")}
    assert "The kernel file cannot be opened" in fault(app, "PUT", "/boot-source", missing)
    assert call(app, "PUT", "/boot-source", {"kernel_image_path": str(kernel)})[0] == 204
    root = {"drive_id": "a", "path_on_host": str(kernel), "is_root_device": True, "is_read_only": True}
    assert call(app, "PUT", "/drives/a", root)[0] == 204
    second_root = {**root, "drive_id": "b"}
    assert fault(app, "PUT", "/drives/b", second_root) == ("Drive config error: A root block device already exists!")
    long_tap = {"iface_id": "eth0", "host_dev_name": "tap_0123456789ab"}
    assert "Invalid TAP name" in fault(app, "PUT", "/network-interfaces/eth0", long_tap)
    assert call(app, "PUT", "/actions", {"action_type": "InstanceStart"})[0] == 204

    for method, path, body in [
        ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128}),
        ("PUT", "/boot-source", {"kernel_image_path": str(kernel)}),
        ("PUT", "/drives/a", root),
        ("PUT", "/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "tap0"}),
        ("PUT", "/logger", {"log_path": str(metrics)}),
        ("PUT", "/metrics", {"metrics_path": str(metrics)}),
        ("PUT", "/actions", {"action_type": "InstanceStart"}),
    ]:
        assert fault(app, method, path, body) == fcd.NOT_AFTER_BOOT, path

    assert call(app, "PATCH", "/vm", {"state": "Paused"})[0] == 204
    assert call(app, "GET", "/")[1]["state"] == "Paused"
    assert call(app, "PUT", "/actions", {"action_type": "FlushMetrics"})[0] == 204
    line = json.loads(metrics.read_text().splitlines()[-1])
    assert line["block"]["read_bytes"] == 0  # a paused guest does no I/O
    assert "block_a" in line


def test_every_request_is_recorded(validator: fcd.SpecValidator, tmp_path: Path) -> None:
    app = make_app(validator, tmp_path)
    call(app, "GET", "/version")
    call(app, "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128, "x": 1})
    recorded = harness.read_record(tmp_path / "record.jsonl")
    assert [(r["method"], r["path"], r["status"]) for r in recorded] == [
        ("GET", "/version", 200),
        ("PUT", "/machine-config", 400),
    ]
    assert recorded[1]["body"]["x"] == 1 and "'x' was unexpected" in recorded[1]["fault"]


def test_injected_failure(validator: fcd.SpecValidator, tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("FC_DOUBLE_FAIL", "PUT /drives/{drive_id}")
    app = make_app(validator, tmp_path)
    body = {"drive_id": "a", "path_on_host": "/x", "is_root_device": False, "is_read_only": True}
    assert fault(app, "PUT", "/drives/a", body) == ("Injected failure (FC_DOUBLE_FAIL): PUT /drives/a")
    # still validated first
    assert "deserializing" in fault(app, "PUT", "/drives/a", {"drive_id": "a"})


def test_command_line_is_firecrackers() -> None:
    assert fcd.parse_args(["--api-sock", "/s", "--id", "vm-1"]) == {"--api-sock": "/s", "--id": "vm-1"}
    with pytest.raises(SystemExit, match="wasn't expected"):
        fcd.parse_args(["--api-sock", "/s", "--config-file", "x"])
    with pytest.raises(SystemExit, match="given twice"):
        fcd.parse_args(["--id", "a", "--id", "b"])


def test_tap_and_kvm_checks_are_on_by_default(validator: fcd.SpecValidator, tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.delenv("FC_DOUBLE_CHECK_TAP")
    monkeypatch.delenv("FC_DOUBLE_CHECK_KVM")
    assert fcd.knob_on("FC_DOUBLE_CHECK_TAP") and fcd.knob_on("FC_DOUBLE_CHECK_KVM")
    app = make_app(validator, tmp_path)
    body = {"iface_id": "eth0", "host_dev_name": "tap_nowhere"}
    assert "TAP tap_nowhere does not exist" in fault(app, "PUT", "/network-interfaces/eth0", body)


def booted(validator: fcd.SpecValidator, tmp_path: Path, **drive: Any) -> tuple[fcd.App, Path]:
    app = make_app(validator, tmp_path)
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"k")
    assert call(app, "PUT", "/boot-source", {"kernel_image_path": str(kernel), "boot_args": "console=ttyS0"})[0] == 204
    root = {"drive_id": "root", "path_on_host": str(kernel), "is_root_device": True, "is_read_only": True}
    assert call(app, "PUT", "/drives/root", root)[0] == 204
    assert call(app, "PUT", "/actions", {"action_type": "InstanceStart"})[0] == 204
    return app, kernel


def test_boot_args_that_overflow_with_what_firecracker_appends(validator: fcd.SpecValidator, tmp_path: Path) -> None:
    app = make_app(validator, tmp_path)
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"k")
    args = "a" * 2030  # fits PUT /boot-source's own check (< 2048) ...
    assert call(app, "PUT", "/boot-source", {"kernel_image_path": str(kernel), "boot_args": args})[0] == 204
    root = {"drive_id": "root", "path_on_host": str(kernel), "is_root_device": True, "is_read_only": False}
    assert call(app, "PUT", "/drives/root", root)[0] == 204
    # ... but not with " pci=off root=/dev/vda rw virtio_mmio.device=4K@0xc0001000:5"
    assert app.vmm.final_cmdline() == f"{args} pci=off root=/dev/vda rw virtio_mmio.device=4K@0xc0001000:5"
    assert fault(app, "PUT", "/actions", {"action_type": "InstanceStart"}) == (
        "Start microvm error: Invalid kernel command line: Command line string too large"
    )


def test_snapshot_create_needs_a_paused_vm(validator: fcd.SpecValidator, tmp_path: Path) -> None:
    body = {"snapshot_path": str(tmp_path / "state"), "mem_file_path": str(tmp_path / "mem")}
    fresh = make_app(validator, tmp_path)
    assert fault(fresh, "PUT", "/snapshot/create", body) == fcd.NOT_BEFORE_BOOT
    app, _ = booted(validator, tmp_path)
    assert fault(app, "PUT", "/snapshot/create", body) == fcd.SNAPSHOT_WHILE_RUNNING
    assert not (tmp_path / "state").exists()
    assert call(app, "PATCH", "/vm", {"state": "Paused"})[0] == 204
    assert call(app, "PUT", "/snapshot/create", body)[0] == 204
    assert (tmp_path / "mem").stat().st_size == 128 << 20


def test_snapshot_load_rules(validator: fcd.SpecValidator, tmp_path: Path) -> None:
    app, _ = booted(validator, tmp_path)
    call(app, "PATCH", "/vm", {"state": "Paused"})
    snap = {"snapshot_path": str(tmp_path / "state"), "mem_file_path": str(tmp_path / "mem")}
    assert call(app, "PUT", "/snapshot/create", snap)[0] == 204
    assert fault(app, "PUT", "/snapshot/load", snap) == fcd.NOT_AFTER_BOOT

    # logger and metrics are not boot-specific; a load then leaves the VM paused
    fresh = make_app(validator, tmp_path)
    (tmp_path / "log").write_bytes(b"")
    assert call(fresh, "PUT", "/logger", {"log_path": str(tmp_path / "log")})[0] == 204
    assert call(fresh, "PUT", "/snapshot/load", snap)[0] == 204
    assert call(fresh, "GET", "/")[1]["state"] == "Paused"
    assert fault(fresh, "PUT", "/snapshot/load", snap) == fcd.NOT_AFTER_BOOT
    assert fault(fresh, "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128}) == fcd.NOT_AFTER_BOOT
    resumed = make_app(validator, tmp_path)
    assert call(resumed, "PUT", "/snapshot/load", {**snap, "resume_vm": True})[0] == 204
    assert call(resumed, "GET", "/")[1]["state"] == "Running"

    # any boot-specific request, even a refused one, forbids a load
    for method, path, body in [
        ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128}),
        ("PUT", "/boot-source", {"kernel_image_path": str(tmp_path / "missing")}),
        ("PUT", "/drives/a", {"drive_id": "a", "path_on_host": "/nope", "is_root_device": False, "is_read_only": True}),
        ("PUT", "/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "tap0"}),
        ("PUT", "/vsock", {"guest_cid": 3, "uds_path": str(tmp_path / "v.sock")}),
        ("PUT", "/entropy", {}),
        ("PUT", "/balloon", {"amount_mib": 0, "deflate_on_oom": False}),
    ]:
        other = make_app(validator, tmp_path)
        call(other, method, path, body)
        assert fault(other, "PUT", "/snapshot/load", snap) == fcd.LOAD_NOT_ALLOWED, path
        assert other.vmm.pending_exit is None

    both = {**snap, "mem_backend": {"backend_type": "File", "backend_path": str(tmp_path / "mem")}}
    assert "exactly one of" in fault(make_app(validator, tmp_path), "PUT", "/snapshot/load", both)


def test_a_failed_snapshot_load_ends_the_process(validator: fcd.SpecValidator, tmp_path: Path) -> None:
    (tmp_path / "junk").write_text("not a snapshot")
    app = make_app(validator, tmp_path)
    body = {"snapshot_path": str(tmp_path / "junk"), "mem_file_path": str(tmp_path / "junk")}
    assert "Failed to restore from snapshot" in fault(app, "PUT", "/snapshot/load", body)
    assert app.vmm.pending_exit == 1  # the HTTP handler exits after sending this reply
