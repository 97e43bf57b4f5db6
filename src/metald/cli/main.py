"""The ``metald`` command: the daemon (``serve``) and a client for every RPC."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from metald.config import ConfigError, Settings, load_settings

DEFAULT_SERVER = os.environ.get("METALD_SERVER", "http://127.0.0.1:8080")
STATE_NAMES = {0: "UNSPECIFIED", 1: "CREATED", 2: "RUNNING", 3: "PAUSED", 4: "SHUTDOWN"}


def _size(text: str) -> int:
    """Parse 256M, 1G, 512MiB or a plain byte count."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def _settings_or_exit() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        print(f"metald: invalid configuration: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


# --- daemon ------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from metald.daemon import run
    from metald.observability.logging import setup_logging

    settings = _settings_or_exit()
    setup_logging(settings.log_level)
    try:
        asyncio.run(run(settings))
    except KeyboardInterrupt:
        pass
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    settings = _settings_or_exit()
    values = json.loads(settings.model_dump_json())
    if args.json:
        print(json.dumps(values, indent=2))
    else:
        for key, value in values.items():
            print(f"UNKEY_METALD_{key.upper()}={value}")
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    from metald.cli.cleanup import cleanup

    return asyncio.run(cleanup(_settings_or_exit(), args))


# --- client ------------------------------------------------------------------
def _client(args: argparse.Namespace) -> Any:
    from metald.gen.metal.vmprovisioner.v1.vm_connect import VmServiceClientSync

    return VmServiceClientSync(args.server, timeout_ms=int(args.timeout_ms))


def _pb() -> Any:
    from metald.gen.metal.vmprovisioner.v1 import vm_pb2

    return vm_pb2


def _print(args: argparse.Namespace, message: Any, table: Callable[[], None] | None = None) -> None:
    from google.protobuf import json_format

    if args.json or table is None:
        print(json.dumps(json_format.MessageToDict(message), indent=2))
    else:
        table()


def _state_response(args: argparse.Namespace, vm_id: str, response: Any) -> None:
    _print(args, response, lambda: print(f"{vm_id}\t{STATE_NAMES.get(response.state, response.state)}"))


def cmd_vm_create(args: argparse.Namespace) -> int:
    pb = _pb()
    config = pb.VmConfig(
        cpu=pb.CpuConfig(vcpu_count=args.vcpus),
        memory=pb.MemoryConfig(size_bytes=_size(args.memory)),
        boot=pb.BootConfig(
            kernel_path=args.kernel or "", initrd_path=args.initrd or "", kernel_args=args.args or ""
        ),
    )
    for i, spec in enumerate(args.drive or []):
        path, *flags = spec.split(":")
        config.storage.append(
            pb.StorageDevice(
                id=f"drive{i}", path=path, read_only="ro" in flags, is_root_device="root" in flags
            )
        )
    if args.ip or args.mac or args.port_forward or args.rx_rate or args.tx_rate:
        nic = pb.NetworkInterface(id="eth0", mac_address=args.mac or "")
        if args.ip:
            nic.ipv4_config.address = args.ip
        if args.port_forward:
            nic.options["port_forwards"] = ",".join(args.port_forward)
        if args.rx_rate:
            nic.rx_rate_limit.bandwidth = _size(args.rx_rate)
        if args.tx_rate:
            nic.tx_rate_limit.bandwidth = _size(args.tx_rate)
        config.network.append(nic)
    for item in args.meta or []:
        key, _, value = item.partition("=")
        config.metadata[key] = value
    with _client(args) as client:
        response = client.create_vm(
            pb.CreateVmRequest(vm_id=args.id or "", config=config, customer_id=args.customer or "")
        )
        if args.boot:
            booted = client.boot_vm(pb.BootVmRequest(vm_id=response.vm_id))
            response.state = booted.state
    _state_response(args, response.vm_id, response)
    return 0


def _simple(rpc: str, request_type: str, **extra: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        pb = _pb()
        fields: dict[str, Any] = {"vm_id": args.vm_id}
        for field, attr in extra.items():
            fields[field] = getattr(args, attr)
        with _client(args) as client:
            response = getattr(client, rpc)(getattr(pb, request_type)(**fields))
        if rpc == "delete_vm":
            _print(args, response, lambda: print(f"{args.vm_id}\tdeleted"))
        else:
            _state_response(args, args.vm_id, response)
        return 0

    return run


def cmd_vm_info(args: argparse.Namespace) -> int:
    pb = _pb()
    with _client(args) as client:
        r = client.get_vm_info(pb.GetVmInfoRequest(vm_id=args.vm_id))

    def table() -> None:
        n, m = r.network_info, r.metrics
        rows = [
            ("vm_id", r.vm_id),
            ("state", STATE_NAMES.get(r.state, r.state)),
            ("vcpus", r.config.cpu.vcpu_count),
            ("memory", f"{r.config.memory.size_bytes >> 20} MiB"),
            ("ip", n.ip_address),
            ("mac", n.mac_address),
            ("namespace", n.network_namespace),
            ("tap", n.tap_device),
            ("gateway", n.gateway),
            ("ports", ", ".join(f"{p.host_port}->{p.container_port}/{p.protocol}" for p in n.port_mappings)),
            ("cpu", f"{m.cpu_usage_percent:.1f}%"),
            ("rss", f"{m.memory_usage_bytes >> 20} MiB"),
            ("uptime", f"{m.uptime_seconds}s"),
        ]
        rows += [(f"backend.{k}", v) for k, v in sorted(r.backend_info.items())]
        for key, value in rows:
            print(f"{key:<24}{value}")

    _print(args, r, table)
    return 0


def cmd_vm_list(args: argparse.Namespace) -> int:
    pb = _pb()
    states = [getattr(pb, f"VM_STATE_{s.upper()}") for s in args.state or []]
    vms: list[Any] = []
    token = ""
    total = 0
    with _client(args) as client:
        while True:
            r = client.list_vms(
                pb.ListVmsRequest(state_filter=states, page_size=args.page_size, page_token=token)
            )
            vms.extend(r.vms)
            total = r.total_count
            token = r.next_page_token
            if not token or not args.all:
                break
    if args.json:
        from google.protobuf import json_format

        print(
            json.dumps(
                {
                    "vms": [json_format.MessageToDict(v) for v in vms],
                    "totalCount": total,
                    "nextPageToken": token,
                },
                indent=2,
            )
        )
        return 0
    print(f"{'VM ID':<30}{'STATE':<10}{'VCPU':>5}{'MEMORY':>10}  {'CUSTOMER':<16}CREATED")
    for v in vms:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v.created_timestamp))
        print(
            f"{v.vm_id:<30}{STATE_NAMES.get(v.state, v.state):<10}{v.vcpu_count:>5}"
            f"{(v.memory_size_bytes >> 20):>7}MiB  {v.customer_id:<16}{created}"
        )
    more = f" (more: --all or --page-token {token})" if token else ""
    print(f"{len(vms)} of {total}{more}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metald", description="microVM host agent")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("serve", help="run the daemon").set_defaults(func=cmd_serve)
    p = sub.add_parser("config", help="print the effective configuration")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_config)
    p = sub.add_parser("cleanup", help="remove leftovers; the host setup too when no VM remains")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cleanup)
    p = sub.add_parser("doctor", help="check the host's prerequisites")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=lambda a: __import__("metald.cli.doctor", fromlist=["main"]).main(a))

    vm = sub.add_parser("vm", help="client commands (talk to a running metald)")
    vm.add_argument("--server", default=DEFAULT_SERVER, help="metald API URL (env METALD_SERVER)")
    vm.add_argument("--json", action="store_true", help="machine-readable output")
    vm.add_argument("--timeout-ms", default=120_000, type=int)
    vsub = vm.add_subparsers(dest="vm_command", required=True)

    c = vsub.add_parser("create", help="create a VM (defaults: the bundled image)")
    c.add_argument("--id", help="VM id (letters, digits, hyphens; generated if omitted)")
    c.add_argument("--vcpus", type=int, default=1)
    c.add_argument("--memory", default="256M", help="e.g. 256M, 1G")
    c.add_argument("--kernel")
    c.add_argument("--initrd")
    c.add_argument("--args", help="kernel command line")
    c.add_argument("--drive", action="append", help="PATH[:ro][:root], repeatable")
    c.add_argument("--ip", help="requested IPv4 address")
    c.add_argument("--mac")
    c.add_argument("--port-forward", action="append", help="GUEST[/tcp|udp] or HOST:GUEST[/proto]")
    c.add_argument("--rx-rate", help="guest receive limit, bytes/s (e.g. 10M)")
    c.add_argument("--tx-rate", help="guest transmit limit, bytes/s")
    c.add_argument("--customer")
    c.add_argument("--meta", action="append", help="KEY=VALUE, repeatable")
    c.add_argument("--boot", action="store_true", help="boot it right away")
    c.set_defaults(func=cmd_vm_create)

    for name, rpc, req in (
        ("boot", "boot_vm", "BootVmRequest"),
        ("pause", "pause_vm", "PauseVmRequest"),
        ("resume", "resume_vm", "ResumeVmRequest"),
    ):
        p = vsub.add_parser(name)
        p.add_argument("vm_id")
        p.set_defaults(func=_simple(rpc, req))
    p = vsub.add_parser("shutdown")
    p.add_argument("vm_id")
    p.add_argument("--force", action="store_true")
    p.add_argument("--timeout", type=int, default=0, help="seconds before a forced stop")
    p.set_defaults(func=_simple("shutdown_vm", "ShutdownVmRequest", force="force", timeout_seconds="timeout"))
    p = vsub.add_parser("reboot")
    p.add_argument("vm_id")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=_simple("reboot_vm", "RebootVmRequest", force="force"))
    p = vsub.add_parser("delete")
    p.add_argument("vm_id")
    p.add_argument("--force", action="store_true", help="also a RUNNING or PAUSED VM")
    p.set_defaults(func=_simple("delete_vm", "DeleteVmRequest", force="force"))
    p = vsub.add_parser("info")
    p.add_argument("vm_id")
    p.set_defaults(func=cmd_vm_info)
    p = vsub.add_parser("list")
    p.add_argument("--state", action="append", choices=["created", "running", "paused", "shutdown"])
    p.add_argument("--page-size", type=int, default=0)
    p.add_argument("--all", action="store_true", help="follow page tokens")
    p.set_defaults(func=cmd_vm_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Exception as exc:
        from connectrpc.errors import ConnectError

        if isinstance(exc, ConnectError):
            print(f"error: {exc.code.value}: {exc.message}", file=sys.stderr)
            return 1
        if type(exc).__module__.startswith("pyqwest") or isinstance(exc, ConnectionError | OSError):
            print(f"error: cannot reach metald at {getattr(args, 'server', '?')}: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    raise SystemExit(main())
