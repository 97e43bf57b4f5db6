"""Core values to protobuf messages."""

from __future__ import annotations

from typing import cast

from metald.core.engine import VmView
from metald.core.models import VmMetrics
from metald.core.records import VmRecord
from metald.gen.metal.vmprovisioner.v1 import vm_pb2 as pb


def wire_state(state: int) -> pb.VmState:
    """The wire enum of a core VmState (the same numbers)."""
    return cast(pb.VmState, int(state))


def vm_info(row: VmRecord) -> pb.VmInfo:
    return pb.VmInfo(
        vm_id=row.vm_id,
        state=wire_state(row.state),
        vcpu_count=row.vcpu_count,
        memory_size_bytes=row.memory_bytes,
        created_timestamp=row.created_at,
        modified_timestamp=row.modified_at,
        metadata=row.metadata,
        customer_id=row.customer_id,
    )


def metrics(m: VmMetrics) -> pb.VmMetrics:
    return pb.VmMetrics(
        cpu_usage_percent=m.cpu_usage_percent,
        memory_usage_bytes=m.memory_usage_bytes,
        network_stats=pb.NetworkStats(
            bytes_received=m.net_rx_bytes,
            bytes_transmitted=m.net_tx_bytes,
            packets_received=m.net_rx_packets,
            packets_transmitted=m.net_tx_packets,
        ),
        storage_stats=pb.StorageStats(
            bytes_read=m.block_read_bytes,
            bytes_written=m.block_write_bytes,
            read_operations=m.block_read_ops,
            write_operations=m.block_write_ops,
        ),
        uptime_seconds=m.uptime_seconds,
    )


def vm_info_response(view: VmView) -> pb.GetVmInfoResponse:
    config = pb.VmConfig()
    config.ParseFromString(view.row.config)
    response = pb.GetVmInfoResponse(
        vm_id=view.row.vm_id,
        config=config,
        state=wire_state(view.row.state),
        metrics=metrics(view.metrics),
        backend_info=view.backend_info,
    )
    net = view.network
    if net is not None:
        response.network_info.CopyFrom(
            pb.VmNetworkInfo(
                ip_address=net.ip,
                mac_address=net.mac,
                tap_device=net.tap,
                network_namespace=net.namespace,
                gateway=net.gateway,
                dns_servers=list(net.dns_servers),
                port_mappings=[
                    pb.PortMapping(
                        container_port=p.guest_port, host_port=p.host_port, protocol=p.protocol
                    )
                    for p in net.port_forwards
                ],
            )
        )
    return response
