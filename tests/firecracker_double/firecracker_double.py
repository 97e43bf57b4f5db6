#!/usr/bin/env python3
# THIS IS A TEST DOUBLE of Firecracker, not Firecracker. It exists because no
# registry this project can use ships a Firecracker binary, and /dev/kvm on the
# test machines cannot run stock guests. Never install it as a real VMM.
#
# By default it runs no guest. It is started like Firecracker (`--api-sock PATH
# --id ID`, `--version`), serves Firecracker's HTTP API on the unix socket, and
# checks every request strictly against Firecracker's official API description
# (firecracker-api-v1.16.1.yaml, Swagger 2.0) and against Firecracker's own
# rules (pre-boot/post-boot operations, ids, files that must exist and open
# with the process's own credentials, ...), so that a client that works
# against it speaks exactly what Firecracker expects.
#
# With FC_DOUBLE_BOOT_QEMU=1 it boots a real guest, with QEMU standing in for
# Firecracker's KVM-based VMM: on InstanceStart it runs `qemu-system-x86_64 -M
# microvm -accel tcg` with the configured kernel, initrd, drives, boot args
# (plus tsc_early_khz), TAP and guest MAC, 1 vCPU and mem_size_mib; the guest's
# serial console goes to the double's stdout (where Firecracker writes it).
# PATCH /vm Paused/Resumed become QMP stop/cont, SendCtrlAltDel becomes QMP
# system_powerdown (the bundled guest powers off on the ACPI power button), and
# the double exits when QEMU does. QEMU is dynamically linked, so this mode
# cannot run inside a jail's chroot: use it with the jailer off.
#
# Snapshots (PUT /snapshot/create, /snapshot/load) follow Firecracker's state
# rules: create only while Paused; load only on a fresh process, before any
# boot-specific request (machine config, boot source, drives, network, balloon,
# vsock, entropy, MMDS config, pmem, memory hotplug; logger and metrics are
# fine); a loaded VM stays Paused unless resume_vm; a load that fails ends the
# process (exit status 1) after the reply. The files are the double's own JSON
# state and a sparse memory file, not Firecracker's format.
#
# Dependencies: the Python standard library, PyYAML and jsonschema (and QEMU
# for FC_DOUBLE_BOOT_QEMU).
#
# Test-double-only command-line option (Firecracker has none such):
#   --double-knobs FILE   KEY=VALUE lines setting the knobs below; must come
#                         first. For a double started with an empty
#                         environment (e.g. by a jailer).
#
# Environment knobs (all optional):
#   FC_DOUBLE_SPEC        path of the API YAML (default: found next to the repo,
#                         ../shared/firecracker/firecracker-api-v1.16.1.yaml)
#   FC_DOUBLE_RECORD      append every request as a JSON line
#                         {"method","path","body","status","fault"} to this file
#   FC_DOUBLE_FAIL        comma-separated "METHOD /path" items (a concrete path or
#                         the spec's template, e.g. "PUT /drives/{drive_id}"):
#                         such requests are validated, then refused with 400
#   FC_DOUBLE_FAIL_MESSAGE  the fault_message of those refusals
#   FC_DOUBLE_CHECK_TAP   on unless "0": PUT /network-interfaces opens the TAP as
#                         Firecracker does (/dev/net/tun, TUNSETIFF IFF_TAP|
#                         IFF_NO_PI|IFF_VNET_HDR) with the double's own
#                         credentials, after checking that it exists in its
#                         network namespace
#   FC_DOUBLE_CHECK_KVM   on unless "0": InstanceStart opens /dev/kvm read-write
#                         and asks its API version, as Firecracker does when it
#                         builds the VM
#   FC_DOUBLE_EXIT_AFTER_START=N  exit with status N shortly after InstanceStart
#                         (Firecracker's own codes: 148 seccomp violation, ...)
#   FC_DOUBLE_CONSOLE_FLOOD=N  after InstanceStart the "guest" prints N bytes of
#                         numbered lines to the serial console (stdout) as fast
#                         as it can, then "[double] console flood done" to stderr
#   FC_DOUBLE_BOOT_QEMU=1 boot a real guest with QEMU (see above)
#   FC_DOUBLE_QEMU        the QEMU binary (qemu-system-x86_64)
#   FC_DOUBLE_TSC_KHZ     the host TSC rate for tsc_early_khz (default: read
#                         from the host kernel, as metald's QEMU backend does)
#   FC_DOUBLE_IGNORE_CTRLALTDEL=1  the "guest" ignores SendCtrlAltDel
#   FC_DOUBLE_POWEROFF_DELAY  seconds between SendCtrlAltDel and exit (0.1)
"""A strict test double of the Firecracker VMM's API (see the header comment)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import socket
import socketserver
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import jsonschema  # imported where used: `--version` (health checks) stays quick

SPEC_NAME = "firecracker-api-v1.16.1.yaml"
NOT_AFTER_BOOT = "The requested operation is not supported after starting the microVM."
NOT_BEFORE_BOOT = "The requested operation is not supported before starting the microVM."
LOAD_NOT_ALLOWED = (
    "Load microVM snapshot error: Loading a microVM snapshot not allowed after configuring "
    "boot-specific resources."
)
SNAPSHOT_WHILE_RUNNING = (
    "Create snapshot error: Cannot save the microVM state: Operation not allowed: "
    "save/restore unavailable while running"
)
SNAPSHOT_MAGIC = "THIS IS A FIRECRACKER TEST DOUBLE SNAPSHOT"
DESERIALIZE = "An error occurred when deserializing the json body of a request: {}."
INSTANCE_ID_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")
MAC_RE = re.compile(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$")
IFNAMSIZ = 16
CMDLINE_MAX_SIZE = 2048
# Firecracker's default when boot-source has no boot_args (vmm_config/boot_source.rs)
DEFAULT_BOOT_ARGS = "reboot=k panic=1 nomodule 8250.nr_uarts=0 i8042.noaux i8042.nomux i8042.dumbkbd swiotlb=noforce"


def mmio_device(slot: int) -> str:
    """One ``virtio_mmio.device=`` entry as Firecracker appends it (x86_64: 0xc0001000 + 4 KiB per slot, GSI 5+)."""
    return f"virtio_mmio.device=4K@0x{0xC0001000 + slot * 0x1000:x}:{5 + slot}"

# Path parameters Firecracker checks with `checked_id` and compares with the body.
ID_PARAMS = {"drive_id": "drive_id", "iface_id": "iface_id", "id": "id"}

# (method, template) pairs Firecracker refuses after InstanceStart ...
PRE_BOOT_ONLY = {
    ("PUT", "/boot-source"),
    ("PUT", "/cpu-config"),
    ("PUT", "/drives/{drive_id}"),
    ("PUT", "/pmem/{id}"),
    ("PUT", "/logger"),
    ("PUT", "/serial"),
    ("PUT", "/machine-config"),
    ("PATCH", "/machine-config"),
    ("PUT", "/metrics"),
    ("PUT", "/mmds/config"),
    ("PUT", "/network-interfaces/{iface_id}"),
    ("PUT", "/snapshot/load"),
    ("PUT", "/vsock"),
    ("PUT", "/entropy"),
    ("PUT", "/balloon"),
    ("PUT", "/hotplug/memory"),
}
# Requests that make the process a "boot path" one: a snapshot can no longer be
# loaded (PrebootApiController sets boot_path before even trying them).
BOOT_SPECIFIC = {
    ("PUT", "/boot-source"),
    ("PUT", "/drives/{drive_id}"),
    ("PUT", "/pmem/{id}"),
    ("PUT", "/machine-config"),
    ("PATCH", "/machine-config"),
    ("PUT", "/mmds/config"),
    ("PUT", "/network-interfaces/{iface_id}"),
    ("PUT", "/vsock"),
    ("PUT", "/entropy"),
    ("PUT", "/balloon"),
    ("PUT", "/hotplug/memory"),
}
# ... and before it.
POST_BOOT_ONLY = {
    ("PATCH", "/vm"),
    ("PATCH", "/drives/{drive_id}"),
    ("PATCH", "/pmem/{id}"),
    ("PATCH", "/network-interfaces/{iface_id}"),
    ("PUT", "/snapshot/create"),
    ("PATCH", "/balloon"),
    ("GET", "/balloon/statistics"),
    ("PATCH", "/balloon/statistics"),
    ("PATCH", "/balloon/hinting/start"),
    ("GET", "/balloon/hinting/status"),
    ("PATCH", "/balloon/hinting/stop"),
    ("GET", "/hotplug/memory"),
    ("PATCH", "/hotplug/memory"),
}


class Fault(Exception):
    """A request Firecracker would refuse: HTTP ``status`` with ``fault_message``."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def default_spec_path() -> Path:
    env = os.environ.get("FC_DOUBLE_SPEC")
    if env:
        return Path(env)
    repo_root = Path(__file__).resolve().parents[2]
    candidates = [
        repo_root.parent / "shared" / "firecracker" / SPEC_NAME,
        repo_root / "shared" / "firecracker" / SPEC_NAME,
        Path("/work/shared/firecracker") / SPEC_NAME,
    ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return candidates[0]


def spec_version(path: Path) -> str:
    """``info.version`` of the API description, read without parsing the whole file."""
    found = re.search(r"^info:\n(?:[ \t]+.*\n)*?[ \t]+version:\s*\"?([0-9][^\"\s]*)", path.read_text(), re.MULTILINE)
    return found.group(1) if found else "0.0.0"


def io_error(exc: OSError) -> str:
    """An OSError as Rust's io::Error prints it."""
    return f"{exc.strerror} (os error {exc.errno})"


# --- Swagger 2.0 -> JSON Schema (draft 4) -----------------------------------------

_INT_BOUNDS = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}


def to_json_schema(node: Any) -> Any:
    """Convert one Swagger 2.0 schema object to a strict draft-4 JSON Schema.

    Every object gets ``additionalProperties: false`` unless the spec says
    otherwise (Firecracker's structs use ``deny_unknown_fields``), and integer
    formats become bounds.
    """
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        return {"$ref": node["$ref"]}  # draft 4 ignores a $ref's siblings
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("description", "example", "readOnly", "x-nullable"):
            continue
        if key == "properties":
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = to_json_schema(value)
        elif key == "format" and node.get("type") == "integer":
            low, high = _INT_BOUNDS.get(value, (None, None))
            if low is not None:
                out.setdefault("minimum", low)
                out.setdefault("maximum", high)
        elif key == "format":
            continue  # string formats are informative only (one is a regex)
        else:
            out[key] = value
    if out.get("type") == "object" and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


class Route:
    """One operation of the spec: method + path template (+ body schema)."""

    def __init__(self, method: str, template: str, operation: dict[str, Any], defs: dict) -> None:
        self.method = method
        self.template = template
        self.operation_id = operation.get("operationId", "")
        self.params: list[str] = []
        pattern = re.sub(r"\{([^}]+)\}", self._param, template)
        self.regex = re.compile(f"^{pattern}$")
        self.body_required = False
        self.validator: jsonschema.Draft4Validator | None = None
        for param in operation.get("parameters", []):
            if param.get("in") == "body":
                self.body_required = bool(param.get("required", False))
                schema = to_json_schema(param["schema"])
                schema["definitions"] = defs
                import jsonschema

                self.validator = jsonschema.Draft4Validator(schema)

    def _param(self, match: re.Match[str]) -> str:
        self.params.append(match.group(1))
        return f"(?P<{match.group(1)}>[^/]*)"


class SpecValidator:
    """Checks requests against the official API description."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.version = str(spec.get("info", {}).get("version", "0.0.0"))
        defs = {name: to_json_schema(d) for name, d in spec.get("definitions", {}).items()}
        self.definitions = defs
        self.routes: list[Route] = []
        for template, item in spec.get("paths", {}).items():
            for method, operation in item.items():
                if method.lower() in ("get", "put", "patch", "post", "delete"):
                    self.routes.append(Route(method.upper(), template, operation, defs))

    @classmethod
    def from_file(cls, path: Path) -> SpecValidator:
        with open(path) as fh:
            import yaml

            return cls(yaml.safe_load(fh))

    def definition_validator(self, name: str) -> jsonschema.Draft4Validator:
        """A validator for one named definition (for tests of request bodies)."""
        import jsonschema

        return jsonschema.Draft4Validator({"$ref": f"#/definitions/{name}", "definitions": self.definitions})

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        for route in self.routes:
            if route.method != method:
                continue
            found = route.regex.match(path)
            if found:
                return route, found.groupdict()
        raise Fault(f"Invalid request method and/or path: {method} {path}.")

    def check(self, method: str, path: str, raw: bytes | None) -> tuple[Route, dict[str, str], Any]:
        """Validate one request; return (route, path params, parsed body) or raise Fault."""
        route, params = self.match(method, path)
        for name in params:
            if name in ID_PARAMS:
                checked_id(params[name])
        if not raw:
            if route.body_required or (method in ("PUT", "PATCH") and route.validator):
                raise Fault(f"Empty {method} request.")
            return route, params, None
        if method == "GET":
            raise Fault("GET request cannot have a body.")
        if route.validator is None:
            raise Fault(f"{method} {route.template} does not take a body.")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise Fault(DESERIALIZE.format(exc)) from None
        errors = sorted(route.validator.iter_errors(body), key=lambda e: list(e.absolute_path))
        if errors:
            raise Fault(DESERIALIZE.format("; ".join(_describe(e) for e in errors[:5])))
        for name, field in ID_PARAMS.items():
            if name in params and isinstance(body, dict) and field in body:
                if body[field] != params[name]:
                    raise Fault("The id from the path does not match the id from the body!")
        return route, params, body


def _describe(error: jsonschema.ValidationError) -> str:
    where = "/".join(str(p) for p in error.absolute_path)
    return f"{error.message} (at {where})" if where else error.message


def checked_id(value: str) -> None:
    """Firecracker's rule for resource ids in paths."""
    if not value:
        raise Fault("The ID cannot be empty.")
    if not all(c == "_" or c.isalnum() for c in value):
        raise Fault("API Resource IDs can only contain alphanumeric characters and underscores.")


# --- the microVM's state ---------------------------------------------------------

_BLOCK_KEYS = (
    "activate_fails cfg_fails no_avail_buffer event_fails execute_fails invalid_reqs_count "
    "flush_count queue_event_count rate_limiter_event_count update_count update_fails "
    "read_bytes write_bytes read_count write_count rate_limiter_throttled_events "
    "io_engine_throttled_events"
).split()
_NET_KEYS = (
    "activate_fails cfg_fails mac_address_updates no_rx_avail_buffer no_tx_avail_buffer "
    "event_fails rx_queue_event_count rx_event_rate_limiter_count rx_rate_limiter_throttled "
    "rx_tap_event_count rx_bytes_count rx_packets_count rx_fails rx_count tap_read_fails "
    "tap_write_fails tx_bytes_count tx_malformed_frames tx_fails tx_count tx_packets_count "
    "tx_partial_reads tx_queue_event_count tx_rate_limiter_event_count "
    "tx_rate_limiter_throttled tx_spoofed_mac_count tx_remaining_reqs_count"
).split()

# What the pretend guest does between two flushes, per device (Firecracker
# writes the increase since the previous flush, not running totals).
BLOCK_PER_FLUSH = {"read_bytes": 65536, "read_count": 16, "write_bytes": 16384, "write_count": 4}
NET_PER_FLUSH = {
    "rx_bytes_count": 3000,
    "rx_packets_count": 2,
    "rx_count": 2,
    "tx_bytes_count": 1500,
    "tx_packets_count": 1,
    "tx_count": 1,
}


TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
KVM_GET_API_VERSION = 0xAE00


def open_tap(name: str) -> int:
    """Attach to TAP ``name`` like Firecracker's Tap::open_named; returns the fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        ifreq = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        fcntl.ioctl(fd, TUNSETIFF, ifreq)
    except OSError:
        os.close(fd)
        raise
    return fd


def open_kvm() -> int:
    fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError:
        os.close(fd)
        raise
    if version != 12:
        os.close(fd)
        raise OSError(f"KVM API version {version}, not 12")
    return fd


def knob_on(name: str) -> bool:
    """A check knob: on unless set to "0" (the double is as strict as Firecracker by default)."""
    return os.environ.get(name, "1") != "0"


def _open_nonblock(path: str, flags: int = os.O_RDWR) -> int:
    """Open like Firecracker's open_file_nonblock (never creates the file)."""
    return os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC)


class Vmm:
    """Firecracker's pre-boot / runtime controllers, as far as a double can go."""

    def __init__(self, instance_id: str, version: str, exit_process: Callable[[int], None]) -> None:
        self.instance_id = instance_id
        self.version = version
        self.exit_process = exit_process
        self.lock = threading.Lock()
        self.started = False
        self.paused = False
        self.machine: dict[str, Any] = _default_machine()
        self.boot_source: dict[str, Any] | None = None
        self.drives: dict[str, dict[str, Any]] = {}
        self.nets: dict[str, dict[str, Any]] = {}
        self.logger: dict[str, Any] | None = None
        self.metrics_path: str | None = None
        self.metrics_fd: int | None = None
        self.other: dict[str, Any] = {}
        self.ctrl_alt_del_pending = False
        self.last_flush = time.monotonic()
        self.tap_fds: dict[str, int] = {}
        self.kvm_fd: int | None = None
        self.qemu: QemuGuest | None = None
        self.api_sock = ""
        self.boot_path = False  # a boot-specific request was seen: no snapshot load any more
        self.pending_exit: int | None = None  # exit with this status once the reply is sent

    # Dispatch ----------------------------------------------------------------
    def handle(self, route: Route, params: dict[str, str], body: Any) -> tuple[int, Any]:
        key = (route.method, route.template)
        if key in PRE_BOOT_ONLY and self.started:
            raise Fault(NOT_AFTER_BOOT)
        if key in POST_BOOT_ONLY and not self.started:
            raise Fault(NOT_BEFORE_BOOT)
        if key in BOOT_SPECIFIC:
            self.boot_path = True
        handler = _HANDLERS.get(key)
        if handler is not None:
            return handler(self, params, body)
        if route.method == "GET":
            raise Fault(f"THIS TEST DOUBLE does not implement {route.method} {route.template}.")
        self.other[f"{route.method} {route.template} {params}"] = body
        return 204, None

    # GETs ------------------------------------------------------------------------
    def get_instance(self, _p: dict, _b: Any) -> tuple[int, Any]:
        state = "Not started" if not self.started else ("Paused" if self.paused else "Running")
        return 200, {
            "app_name": "Firecracker",
            "id": self.instance_id,
            "state": state,
            "vmm_version": self.version,
        }

    def get_version(self, _p: dict, _b: Any) -> tuple[int, Any]:
        return 200, {"firecracker_version": self.version}

    def get_machine_config(self, _p: dict, _b: Any) -> tuple[int, Any]:
        return 200, dict(self.machine)

    def get_vm_config(self, _p: dict, _b: Any) -> tuple[int, Any]:
        config: dict[str, Any] = {
            "machine-config": dict(self.machine),
            "drives": list(self.drives.values()),
            "network-interfaces": list(self.nets.values()),
        }
        if self.boot_source is not None:
            config["boot-source"] = self.boot_source
        if self.logger is not None:
            config["logger"] = self.logger
        if self.metrics_path is not None:
            config["metrics"] = {"metrics_path": self.metrics_path}
        return 200, config

    # Pre-boot configuration --------------------------------------------------
    def put_logger(self, _p: dict, body: dict[str, Any]) -> tuple[int, Any]:
        path = body.get("log_path")
        if path is not None:
            try:
                os.close(_open_nonblock(path))
            except OSError as exc:
                raise Fault(f"Logger error: Failed to open target file: {io_error(exc)}") from None
        self.logger = body
        return 204, None

    def put_metrics(self, _p: dict, body: dict[str, Any]) -> tuple[int, Any]:
        if self.metrics_fd is not None:
            raise Fault("Metrics error: Reinitialization of metrics not allowed.")
        try:
            self.metrics_fd = _open_nonblock(body["metrics_path"])
        except OSError as exc:
            raise Fault(f"Metrics error: {io_error(exc)}") from None
        self.metrics_path = body["metrics_path"]
        return 204, None

    def put_machine_config(self, _p: dict, body: dict[str, Any]) -> tuple[int, Any]:
        self.machine = _check_machine({**_default_machine(), **body})
        return 204, None

    def patch_machine_config(self, _p: dict, body: dict[str, Any]) -> tuple[int, Any]:
        self.machine = _check_machine({**self.machine, **body})
        return 204, None

    def put_boot_source(self, _p: dict, body: dict[str, Any]) -> tuple[int, Any]:
        try:
            os.close(os.open(body["kernel_image_path"], os.O_RDONLY | os.O_CLOEXEC))
        except OSError as exc:
            raise Fault(f"Boot source error: The kernel file cannot be opened: {io_error(exc)}") from None
        if "initrd_path" in body:
            try:
                os.close(os.open(body["initrd_path"], os.O_RDONLY | os.O_CLOEXEC))
            except OSError as exc:
                raise Fault(
                    "Boot source error: The initrd file cannot be opened due to invalid path or "
                    f"invalid permissions. {io_error(exc)}"
                ) from None
        if len(body.get("boot_args", "")) >= CMDLINE_MAX_SIZE:
            raise Fault("Boot source error: The kernel command line is invalid: Command line string too large")
        self.boot_source = body
        return 204, None

    def put_drive(self, params: dict[str, str], body: dict[str, Any]) -> tuple[int, Any]:
        drive_id = params["drive_id"]
        if "socket" not in body:
            missing = [f for f in ("path_on_host", "is_read_only") if f not in body]
            if missing:
                raise Fault(
                    "Drive config error: Unable to create the virtio block device: "
                    f"{' and '.join(missing)} required for a virtio-block drive"
                )
            flags = os.O_RDONLY if body["is_read_only"] else os.O_RDWR
            try:
                os.close(os.open(body["path_on_host"], flags | os.O_CLOEXEC))
            except OSError as exc:
                raise Fault(
                    "Drive config error: Unable to create the virtio block device: Virtio "
                    f"backend error: Error manipulating the backing file: {io_error(exc)} "
                    f"{body['path_on_host']}"
                ) from None
        if body["is_root_device"]:
            for other_id, other in self.drives.items():
                if other_id != drive_id and other["is_root_device"]:
                    raise Fault("Drive config error: A root block device already exists!")
        self.drives[drive_id] = body
        return 204, None

    def put_net(self, params: dict[str, str], body: dict[str, Any]) -> tuple[int, Any]:
        iface_id = params["iface_id"]
        tap = body["host_dev_name"]
        mac = body.get("guest_mac")
        if mac is not None and not MAC_RE.match(mac):
            raise Fault(DESERIALIZE.format(f"invalid MAC address {mac!r}"))
        if not tap or len(tap.encode()) >= IFNAMSIZ:
            raise Fault(
                "Network config error: Could not create the network device: Open tap device "
                f"failed: Invalid TAP name: {tap}"
            )
        for other_id, other in self.nets.items():
            if other_id == iface_id:
                continue
            if mac is not None and other.get("guest_mac", "").lower() == mac.lower():
                raise Fault(f"Network config error: The MAC address is already in use: {mac}")
            if other["host_dev_name"] == tap:
                raise Fault(
                    "Network config error: Could not create the network device: Open tap "
                    "device failed: Error while creating ifreq structure: Device or resource "
                    "busy (os error 16)."
                )
        if knob_on("FC_DOUBLE_CHECK_TAP"):
            self._attach_tap(iface_id, tap)
        self.nets[iface_id] = body
        return 204, None

    def _attach_tap(self, iface_id: str, tap: str) -> None:
        prefix = "Network config error: Could not create the network device: Open tap device failed: "
        try:
            socket.if_nametoindex(tap)
        except OSError:
            raise Fault(f"{prefix}TAP {tap} does not exist in this network namespace") from None
        old = self.tap_fds.pop(iface_id, None)
        if old is not None:
            os.close(old)
        try:
            self.tap_fds[iface_id] = open_tap(tap)
        except OSError as exc:
            raise Fault(
                f"{prefix}Error while creating ifreq structure: {io_error(exc)}. Invalid TUN/TAP "
                f"Backend provided by {tap}. Check our documentation on setting up the network "
                "devices."
            ) from None

    # Actions and runtime -----------------------------------------------------------
    def put_action(self, _p: dict, body: dict[str, Any]) -> tuple[int, Any]:
        action = body["action_type"]
        if action == "InstanceStart":
            if self.started:
                raise Fault(NOT_AFTER_BOOT)
            if self.boot_source is None:
                raise Fault("Start microvm error: Cannot start microvm without kernel configuration.")
            if len(self.final_cmdline().encode()) >= CMDLINE_MAX_SIZE:
                raise Fault("Start microvm error: Invalid kernel command line: Command line string too large")
            if knob_on("FC_DOUBLE_CHECK_KVM"):
                try:
                    self.kvm_fd = open_kvm()
                except OSError as exc:
                    raise Fault(
                        "Start microvm error: Cannot start the VM because the KVM module is not "
                        f"available: Error creating KVM object: {io_error(exc)}"
                    ) from None
            if os.environ.get("FC_DOUBLE_BOOT_QEMU") == "1":
                self._boot_qemu()
            else:
                print(f"[double] {self.instance_id}: InstanceStart", flush=True)
            self.started = True
            self.last_flush = time.monotonic()
            self._after_start()
            return 204, None
        if not self.started:
            raise Fault(NOT_BEFORE_BOOT)
        if action == "FlushMetrics":
            self.flush_metrics()  # like Firecracker: nothing written if never configured
            return 204, None
        # SendCtrlAltDel
        if os.environ.get("FC_DOUBLE_IGNORE_CTRLALTDEL") != "1":
            self.ctrl_alt_del_pending = True
            if not self.paused:
                self._schedule_poweroff()
        return 204, None

    def _after_start(self) -> None:
        """The FC_DOUBLE_EXIT_AFTER_START and FC_DOUBLE_CONSOLE_FLOOD knobs."""
        code = os.environ.get("FC_DOUBLE_EXIT_AFTER_START")
        if code:
            timer = threading.Timer(0.2, self.exit_process, args=(int(code),))
            timer.daemon = True
            timer.start()
        flood = int(os.environ.get("FC_DOUBLE_CONSOLE_FLOOD", "0") or 0)
        if flood > 0:
            threading.Thread(target=_flood_console, args=(flood,), daemon=True).start()

    # Snapshots ---------------------------------------------------------------------
    def put_snapshot_create(self, _p: dict, body: dict[str, Any]) -> tuple[int, Any]:
        if not self.paused:
            raise Fault(SNAPSHOT_WHILE_RUNNING)
        state = {
            "magic": SNAPSHOT_MAGIC,
            "machine": self.machine,
            "drives": self.drives,
            "nets": self.nets,
            "boot_source": self.boot_source,
        }
        try:
            with open(body["snapshot_path"], "w") as fh:  # created or truncated, as Firecracker does
                json.dump(state, fh)
            with open(body["mem_file_path"], "wb") as fh:
                fh.truncate(self.machine["mem_size_mib"] << 20)
        except OSError as exc:
            raise Fault(f"Create snapshot error: Cannot save the microVM state: {io_error(exc)}") from None
        return 204, None

    def put_snapshot_load(self, _p: dict, body: dict[str, Any]) -> tuple[int, Any]:
        if self.boot_path:
            raise Fault(LOAD_NOT_ALLOWED)
        if ("mem_file_path" in body) == ("mem_backend" in body):
            raise Fault(DESERIALIZE.format("exactly one of mem_file_path and mem_backend must be given"))
        try:
            state = self._restore(body)
        except (OSError, ValueError, KeyError) as exc:
            # Firecracker considers the process too dirty to recover and exits.
            self.pending_exit = 1
            detail = io_error(exc) if isinstance(exc, OSError) else str(exc)
            raise Fault(f"Load microVM snapshot error: Failed to restore from snapshot: {detail}") from None
        self.machine, self.drives, self.nets = state["machine"], state["drives"], state["nets"]
        self.boot_source = state.get("boot_source")
        for override in body.get("network_overrides", []):
            if override["iface_id"] in self.nets:
                self.nets[override["iface_id"]]["host_dev_name"] = override["host_dev_name"]
        self.started = True
        self.paused = not body.get("resume_vm", False)  # loaded VMs stay paused unless asked
        self.last_flush = time.monotonic()
        return 204, None

    def _restore(self, body: dict[str, Any]) -> dict[str, Any]:
        with open(body["snapshot_path"]) as fh:
            state = json.load(fh)
        if not isinstance(state, dict) or state.get("magic") != SNAPSHOT_MAGIC:
            raise ValueError(f"{body['snapshot_path']} is not a snapshot of this double")
        backend = body.get("mem_backend") or {"backend_type": "File", "backend_path": body["mem_file_path"]}
        if backend["backend_type"] == "File":
            os.close(os.open(backend["backend_path"], os.O_RDONLY | os.O_CLOEXEC))
        else:  # Uffd: Firecracker connects to the page-fault handler's socket
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(backend["backend_path"])
        return state

    def patch_vm(self, _p: dict, body: dict[str, Any]) -> tuple[int, Any]:
        paused = body["state"] == "Paused"
        if self.qemu is not None:
            self.qemu.qmp("stop" if paused else "cont")
        self.paused = paused
        if not self.paused and self.ctrl_alt_del_pending:
            self._schedule_poweroff()
        return 204, None

    def final_cmdline(self) -> str:
        """boot_args plus what Firecracker's builder.rs inserts before checking the 2048-byte limit."""
        assert self.boot_source is not None
        words = [self.boot_source.get("boot_args", DEFAULT_BOOT_ARGS), "pci=off"]
        slot = 0
        for drive in sorted(self.drives.values(), key=lambda d: not d["is_root_device"]):
            if drive["is_root_device"]:
                words += ["root=/dev/vda", "ro" if drive.get("is_read_only") else "rw"]
            words.append(mmio_device(slot))
            slot += 1
        for _ in self.nets:
            words.append(mmio_device(slot))
            slot += 1
        return " ".join(w for w in words if w)

    def _boot_qemu(self) -> None:
        """Start the real guest (FC_DOUBLE_BOOT_QEMU=1); exit when QEMU exits."""
        for fd in self.tap_fds.values():  # QEMU attaches to the TAP itself
            os.close(fd)
        self.tap_fds.clear()
        assert self.boot_source is not None
        argv = qemu_argv(self, qmp_path=self.api_sock + ".qmp")
        print(f"[double] {self.instance_id}: InstanceStart: {' '.join(argv)}", file=sys.stderr, flush=True)
        try:
            self.qemu = QemuGuest.start(argv, self.api_sock + ".qmp", self.exit_process)
        except (OSError, RuntimeError) as exc:
            raise Fault(f"Start microvm error: THIS TEST DOUBLE could not start QEMU: {exc}") from None

    def _schedule_poweroff(self) -> None:
        if self.qemu is not None:
            self.qemu.press_power_button()  # the guest powers off; QEMU's exit ends the double
            return
        delay = float(os.environ.get("FC_DOUBLE_POWEROFF_DELAY", "0.1"))

        def poweroff() -> None:
            with self.lock:
                self.flush_metrics()
            print(f"[double] {self.instance_id}: guest powered off", flush=True)
            self.exit_process(0)

        timer = threading.Timer(delay, poweroff)
        timer.daemon = True
        timer.start()

    def flush_metrics(self) -> None:
        if self.metrics_fd is None:
            return
        running = self.started and not self.paused
        line: dict[str, Any] = {"utc_timestamp_ms": int(time.time() * 1000)}
        block_total = dict.fromkeys(_BLOCK_KEYS, 0)
        for drive_id, drive in self.drives.items():
            device = dict.fromkeys(_BLOCK_KEYS, 0)
            if running:
                for key, value in BLOCK_PER_FLUSH.items():
                    if key.startswith("write") and drive.get("is_read_only"):
                        continue
                    device[key] = value
            line[f"block_{drive_id}"] = device
            for key, value in device.items():
                block_total[key] += value
        line["block"] = block_total
        net_total = dict.fromkeys(_NET_KEYS, 0)
        for iface_id in self.nets:
            device = dict.fromkeys(_NET_KEYS, 0)
            if running:
                device.update(NET_PER_FLUSH)
            line[f"net_{iface_id}"] = device
            for key, value in device.items():
                net_total[key] += value
        line["net"] = net_total
        line["vmm"] = {"panic_count": 0}
        data = (json.dumps(line, separators=(",", ":")) + "\n").encode()
        try:
            os.write(self.metrics_fd, data)
        except BlockingIOError:
            pass  # a FIFO nobody reads: Firecracker drops the line too


def _flood_console(total: int) -> None:
    """A guest printing without end (FC_DOUBLE_CONSOLE_FLOOD): numbered lines to the serial port."""
    written = 0
    n = 0
    out = sys.stdout.buffer
    while written < total:
        chunk = b"".join(b"guest line %09d %s\n" % (n + i, b"x" * 40) for i in range(64))
        n += 64
        try:
            out.write(chunk)
            out.flush()
        except OSError:
            return
        written += len(chunk)
    print(f"[double] console flood done: {written} bytes, last line {n - 1}", file=sys.stderr, flush=True)


# --- FC_DOUBLE_BOOT_QEMU: a real guest under QEMU ------------------------------

QEMU_MACHINE = "microvm,x-option-roms=off,isa-serial=on"
POWER_BUTTON_REPEAT_S = 2.0  # the guest hears the ACPI button only once its handler runs


def _tsc_khz() -> int | None:
    value = os.environ.get("FC_DOUBLE_TSC_KHZ")
    if value:
        return int(value)
    try:
        from metald.backends.qemu.clock import cached_host_tsc_khz
    except ImportError:
        return None
    return cached_host_tsc_khz()


def _opt(value: str) -> str:
    return value.replace(",", ",,")


def qemu_argv(vmm: Vmm, qmp_path: str) -> list[str]:
    """QEMU standing in for Firecracker's VMM: the same kernel, initrd, drives, TAP and MAC."""
    boot = vmm.boot_source or {}
    args = boot.get("boot_args", "")
    khz = _tsc_khz()
    if khz and "tsc_early_khz=" not in args:
        args = f"{args} tsc_early_khz={khz}".strip()  # TCG guests hang calibrating their TSC without it
    argv = [
        os.environ.get("FC_DOUBLE_QEMU", "qemu-system-x86_64"),
        "-M", QEMU_MACHINE,
        "-accel", "tcg",
        "-cpu", "max",
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-no-reboot",  # like Firecracker: a guest reboot ends the VMM
        "-name", f"guest={_opt(vmm.instance_id)}",
        "-smp", "1",
        "-m", str(vmm.machine["mem_size_mib"]),
        "-kernel", boot["kernel_image_path"],
        "-append", args,
    ]  # fmt: skip
    if "initrd_path" in boot:
        argv += ["-initrd", boot["initrd_path"]]
    drives = sorted(vmm.drives.values(), key=lambda d: not d["is_root_device"])  # root is /dev/vda
    for i, drive in enumerate(drives):
        opts = f"id=drv{i},file={_opt(drive['path_on_host'])},format=raw,if=none"
        if drive["is_read_only"]:
            opts += ",readonly=on"
        argv += ["-drive", opts, "-device", f"virtio-blk-device,drive=drv{i}"]
    for i, net in enumerate(vmm.nets.values()):
        device = f"virtio-net-device,netdev=net{i}"
        if net.get("guest_mac"):
            device += f",mac={net['guest_mac']}"
        tap = _opt(net["host_dev_name"])
        argv += ["-netdev", f"tap,id=net{i},ifname={tap},script=no,downscript=no,vhost=off", "-device", device]
    argv += ["-chardev", "stdio,id=console0,signal=off", "-serial", "chardev:console0"]
    argv += ["-qmp", f"unix:{_opt(qmp_path)},server=on,wait=off"]
    return argv


def _die_with_parent() -> None:
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class QemuGuest:
    """One QEMU child, driven over QMP; its exit ends the double."""

    def __init__(self, qmp_path: str) -> None:
        self.qmp_path = qmp_path
        self.sock: socket.socket | None = None
        self.reader: Any = None
        self.lock = threading.Lock()
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready = threading.Event()
        self.failed: str | None = None

    @classmethod
    def start(cls, argv: list[str], qmp_path: str, exit_process: Callable[[int], None]) -> QemuGuest:
        guest = cls(qmp_path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(qmp_path)
        # QEMU gets SIGKILL when the thread that started it ends, so a thread that
        # lives as long as QEMU starts and waits for it.
        thread = threading.Thread(target=guest._supervise, args=(argv, exit_process), daemon=True)
        thread.start()
        if not guest.ready.wait(30) or guest.failed:
            raise RuntimeError(guest.failed or "QMP did not answer within 30 s")
        return guest

    def _supervise(self, argv: list[str], exit_process: Callable[[int], None]) -> None:
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)  # noqa: PLW1509
        except OSError as exc:
            self.failed = f"{argv[0]}: {exc}"
            self.ready.set()
            return
        try:
            self._connect()
        except (OSError, RuntimeError, ValueError) as exc:
            self.failed = f"QMP: {exc}"
            self.proc.kill()
        self.ready.set()
        code = self.proc.wait()
        print(f"[double] QEMU exited with status {code}", file=sys.stderr, flush=True)
        if not self.failed:
            exit_process(0 if code == 0 else 1)

    def _connect(self) -> None:
        deadline = time.monotonic() + 20
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"QEMU exited with status {self.proc.returncode}")
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(self.qmp_path)
                break
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        sock.settimeout(10)
        self.sock = sock
        self.reader = sock.makefile("rb")
        self._read_reply(greeting=True)
        self.qmp("qmp_capabilities")

    def _read_reply(self, greeting: bool = False) -> Any:
        while True:
            line = self.reader.readline()
            if not line:
                raise RuntimeError("QMP connection closed")
            msg = json.loads(line)
            if greeting and "QMP" in msg:
                return msg
            if "return" in msg:
                return msg["return"]
            if "error" in msg:
                raise RuntimeError(f"QMP error: {msg['error']}")
            # an event: skip

    def qmp(self, command: str) -> Any:
        with self.lock:
            if self.sock is None:
                raise Fault("THIS TEST DOUBLE has no QMP connection to QEMU")
            try:
                self.sock.sendall(json.dumps({"execute": command}).encode() + b"\n")
                return self._read_reply()
            except (OSError, RuntimeError, ValueError) as exc:
                raise Fault(f"THIS TEST DOUBLE: QMP {command} failed: {exc}") from None

    def press_power_button(self) -> None:
        """system_powerdown, repeated until QEMU exits (an early press is lost)."""

        def repeat() -> None:
            while self.proc is not None and self.proc.poll() is None:
                with contextlib.suppress(Fault):
                    self.qmp("system_powerdown")
                time.sleep(POWER_BUTTON_REPEAT_S)

        threading.Thread(target=repeat, daemon=True).start()


def _default_machine() -> dict[str, Any]:
    return {
        "vcpu_count": 1,
        "mem_size_mib": 128,
        "smt": False,
        "track_dirty_pages": False,
        "huge_pages": "None",
    }


def _check_machine(config: dict[str, Any]) -> dict[str, Any]:
    vcpus = config["vcpu_count"]
    if config.get("smt") and vcpus > 1 and vcpus % 2:
        raise Fault(
            "Machine config error: The number of vCPUs must be greater than 0, less than 32 "
            "and must be 1 or an even number if SMT is enabled."
        )
    mem = config["mem_size_mib"]
    if mem <= 0 or (config.get("huge_pages") == "2M" and mem % 2):
        raise Fault(
            "Machine config error: The memory size (MiB) is either 0, or not a multiple of the configured page size."
        )
    return config


_HANDLERS: dict[tuple[str, str], Callable[[Vmm, dict, Any], tuple[int, Any]]] = {
    ("GET", "/"): Vmm.get_instance,
    ("GET", "/version"): Vmm.get_version,
    ("GET", "/machine-config"): Vmm.get_machine_config,
    ("GET", "/vm/config"): Vmm.get_vm_config,
    ("PUT", "/logger"): Vmm.put_logger,
    ("PUT", "/metrics"): Vmm.put_metrics,
    ("PUT", "/machine-config"): Vmm.put_machine_config,
    ("PATCH", "/machine-config"): Vmm.patch_machine_config,
    ("PUT", "/boot-source"): Vmm.put_boot_source,
    ("PUT", "/drives/{drive_id}"): Vmm.put_drive,
    ("PUT", "/network-interfaces/{iface_id}"): Vmm.put_net,
    ("PUT", "/actions"): Vmm.put_action,
    ("PATCH", "/vm"): Vmm.patch_vm,
    ("PUT", "/snapshot/create"): Vmm.put_snapshot_create,
    ("PUT", "/snapshot/load"): Vmm.put_snapshot_load,
}


# --- HTTP over the unix socket -----------------------------------------------------


def injected_failure(method: str, path: str, template: str) -> str | None:
    items = [i.strip() for i in os.environ.get("FC_DOUBLE_FAIL", "").split(",") if i.strip()]
    for item in items:
        if item in (f"{method} {path}", f"{method} {template}"):
            return os.environ.get("FC_DOUBLE_FAIL_MESSAGE", f"Injected failure (FC_DOUBLE_FAIL): {method} {path}")
    return None


class App:
    """Validation + state + recording, independent of the HTTP server."""

    def __init__(self, validator: SpecValidator, vmm: Vmm, record: Path | None) -> None:
        self.validator = validator
        self.vmm = vmm
        self.record = record

    def request(self, method: str, path: str, raw: bytes | None) -> tuple[int, Any]:
        body: Any = None
        status: int
        payload: Any
        with self.vmm.lock:
            try:
                route, params, body = self.validator.check(method, path, raw)
                fault = injected_failure(method, path, route.template)
                if fault is not None:
                    raise Fault(fault)
                status, payload = self.vmm.handle(route, params, body)
            except Fault as exc:
                status, payload = exc.status, {"fault_message": exc.message}
            self._record(method, path, body, raw, status, payload)
        return status, payload

    def _record(self, method: str, path: str, body: Any, raw: bytes | None, status: int, payload: Any) -> None:
        if self.record is None:
            return
        if body is None and raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode(errors="replace")
        entry = {
            "method": method,
            "path": path,
            "body": body,
            "status": status,
            "fault": payload.get("fault_message") if isinstance(payload, dict) else None,
        }
        with open(self.record, "a") as fh:
            fh.write(json.dumps(entry) + "\n")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "Firecracker API"
    sys_version = ""
    app: App  # set on the subclass made in serve()

    def _handle(self) -> None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._send(400, {"fault_message": "Chunked bodies are not supported."})
            return
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else None
        status, payload = self.app.request(self.command, self.path, raw)
        self._send(status, payload)
        if self.app.vmm.pending_exit is not None:  # e.g. a failed snapshot load
            self.wfile.flush()
            self.app.vmm.exit_process(self.app.vmm.pending_exit)

    do_GET = do_PUT = do_PATCH = _handle

    def _refuse(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        msg = f"Invalid request method and/or path: {self.command} {self.path}."
        self._send(400, {"fault_message": msg})

    do_POST = do_DELETE = do_HEAD = do_OPTIONS = _refuse

    def _send(self, status: int, payload: Any) -> None:
        self.send_response(status)
        if status == 204 or payload is None:
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = json.dumps(payload).encode()
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # the client address of a unix socket is empty; stay quiet


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


USAGE = "THIS IS A TEST DOUBLE of Firecracker.\nusage: firecracker_double.py [--api-sock PATH] [--id ID] [--version]\n"
_VALUE_FLAGS = {"--api-sock", "--id", "--start-time-us", "--start-time-cpu-us", "--parent-cpu-time-us"}


def load_knobs(path: str) -> None:
    """Apply ``--double-knobs FILE`` (KEY=VALUE lines) to this process's os.environ."""
    for line in Path(path).read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            os.environ[key.strip()] = value


def parse_args(argv: list[str]) -> dict[str, str]:
    """Firecracker's command line (the subset metald and the jailer use), strictly.

    A leading ``--double-knobs FILE`` (this double's own option) is applied first.
    """
    if argv[:1] == ["--double-knobs"] and len(argv) >= 2:
        load_knobs(argv[1])
        argv = argv[2:]
    opts: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--version", "--help"):
            opts[arg] = ""
        elif arg in _VALUE_FLAGS:
            if i + 1 >= len(argv):
                raise SystemExit(f"error: argument {arg} needs a value\n{USAGE}")
            if arg in opts:
                raise SystemExit(f"error: argument {arg} given twice")
            opts[arg] = argv[i + 1]
            i += 1
        else:
            raise SystemExit(f"error: Found argument '{arg}' which wasn't expected\n{USAGE}")
        i += 1
    return opts


def main(argv: list[str]) -> int:
    opts = parse_args(argv)
    spec_path = default_spec_path()
    if "--help" in opts:
        print(USAGE)
        return 0
    if "--version" in opts:  # without building the validators: health checks run this, and must be quick
        print(f"Firecracker v{spec_version(spec_path)}\n")
        return 0
    validator = SpecValidator.from_file(spec_path)
    instance_id = opts.get("--id", "anonymous-instance")
    if not INSTANCE_ID_RE.match(instance_id):
        print(f"Invalid instance ID: {instance_id!r}", file=sys.stderr)
        return 1
    sock = opts.get("--api-sock", "/run/firecracker.socket")
    if os.path.exists(sock) or os.path.islink(sock):
        print(
            f"Failed to open the API socket at: {sock}. Check that it is not already used.",
            file=sys.stderr,
        )
        return 1

    def exit_process(code: int) -> None:
        sys.stdout.flush()
        os._exit(code)

    vmm = Vmm(instance_id, validator.version, exit_process)
    vmm.api_sock = sock
    record = os.environ.get("FC_DOUBLE_RECORD")
    app = App(validator, vmm, Path(record) if record else None)
    handler = type("BoundHandler", (Handler,), {"app": app})
    server = Server(sock, handler)
    if stat.S_ISSOCK(os.stat(sock).st_mode):
        print(f"Running Firecracker v{validator.version} (THIS IS A TEST DOUBLE)", flush=True)
    try:
        server.serve_forever(poll_interval=0.05)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
