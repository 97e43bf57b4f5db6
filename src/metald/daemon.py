"""The composition root: settings -> store, backend, network, engine -> server."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING

from metald.api.app import MetaldApp
from metald.api.events import EventServiceImpl, StreamingApp
from metald.api.health import Check, Health
from metald.api.server import ApiServer, ServerOptions
from metald.api.service import VmServiceImpl
from metald.api.tls import ServerTls, open_tls
from metald.backends.factory import make_backend
from metald.config import Settings
from metald.core.engine import VmEngine
from metald.core.ports import Network
from metald.limits import raise_nofile_limit
from metald.recovery import orphans
from metald.recovery.orphans import OrphanWatch
from metald.store.snapshots import SnapshotRepository
from metald.store.sqlite import Store
from metald.store.storage import StorageMonitor, open_store
from metald.store.storage import install as install_storage_monitor
from metald.streams.hub import EventHub
from metald.streams.workload import WorkloadWatcher

if TYPE_CHECKING:
    from metald.observability.metrics import Metrics
    from metald.observability.tracing import Tracing

log = logging.getLogger(__name__)

SETTLE_AT_SHUTDOWN_SECONDS = 1.0


@dataclass
class Daemon:
    settings: Settings
    store: Store
    engine: VmEngine
    app: MetaldApp
    hub: EventHub
    metrics: Metrics | None = None  # set when UNKEY_METALD_OTEL_ENABLED
    tracing: Tracing | None = None
    orphans: OrphanWatch | None = None  # VMs found with no record at start (health check)


def bind_address(settings: Settings) -> str:
    """The address to serve on: with TLS disabled, loopback unless explicitly allowed."""
    try:
        loopback = ipaddress.ip_address(settings.address).is_loopback
    except ValueError:
        loopback = settings.address == "localhost"
    if settings.tls_mode != "disabled" or loopback:
        return settings.address
    if settings.allow_insecure_bind:
        log.warning("serving the API WITHOUT TLS on %s (allowed by configuration)", settings.address)
        return settings.address
    log.warning(
        "TLS is disabled: binding the API to 127.0.0.1 instead of %s; set "
        "UNKEY_METALD_TLS_MODE, or UNKEY_METALD_ALLOW_INSECURE_BIND=true to serve plaintext there",
        settings.address,
    )
    return "127.0.0.1"


async def build(settings: Settings, tls: ServerTls | None = None) -> Daemon:
    store = open_store(settings.db_path)  # StoreOpenError: one line, no traceback
    storage_monitor = StorageMonitor(settings.data_dir)
    install_storage_monitor(storage_monitor)
    backend = await make_backend(settings)
    network: Network | None = None
    if settings.network_enabled:
        from metald.network.manager import NetworkManager

        network = NetworkManager(settings, store)
    from metald.images.vmdisk import VmImages

    def orphan_scan(known: set[str]) -> orphans.Orphans:
        return orphans.scan(settings, known, orphans.store_is_empty(store))

    snapshots = SnapshotRepository(settings.db_path, settings.data_dir / "snapshots")
    snapshots.sweep()  # pending snapshots (a save cut short) and directories without a row
    engine = VmEngine(
        settings, store, backend, network, images=VmImages(settings), orphan_scan=orphan_scan, snapshots=snapshots
    )
    metrics: Metrics | None = None
    tracing: Tracing | None = None
    if settings.otel_enabled:  # imported only when enabled
        from metald.observability.metrics import Metrics
        from metald.observability.tracing import Tracing

        metrics, tracing = Metrics(settings), Tracing(settings)
        metrics.attach(engine)
        tracing.attach(engine)

    async def store_check() -> tuple[bool, str]:
        return await storage_monitor.check(store)

    orphan_watch = OrphanWatch(settings, store)
    checks: dict[str, Check] = {"store": store_check, "backend": backend.ping, "orphans": orphan_watch.check}
    if network is not None:
        checks["network"] = network.check
    health = Health(checks, backend.name, advisory=frozenset({"orphans"}))
    peer_identity = tls.peer_identity if tls is not None else None  # with TLS: the client certificate's SPIFFE ID
    hub = EventHub(store, settings)
    events = StreamingApp(EventServiceImpl(hub, settings), settings.max_request_bytes)
    app = MetaldApp(
        VmServiceImpl(engine, settings), health, settings.max_request_bytes, peer_identity=peer_identity, events=events
    )
    return Daemon(settings, store, engine, app, hub, metrics, tracing, orphan_watch)


async def run(settings: Settings) -> None:
    raise_nofile_limit()  # hundreds of VMs hold sockets, pidfds and netlink handles
    address = bind_address(settings)
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    tls = await open_tls(settings)  # TlsError: refuse to start, never plaintext instead
    daemon = await build(settings, tls)
    await daemon.hub.start()  # before reconcile: its events reach followers who connect early
    with daemon.tracing.span("metald.reconcile") if daemon.tracing else contextlib.nullcontext():
        report = await daemon.engine.start()
    warmer = daemon.engine.backend.warmer()
    if warmer is not None:  # e.g. QEMU's KVM probe, in the background: VMs use TCG until it answers
        await warmer.warm_up()
    if daemon.orphans is not None:
        daemon.orphans.found(report.orphans)
    if daemon.metrics is not None:
        daemon.metrics.record_reconcile(report)
    log.info("metald ready", extra={"port": settings.port, "adopted": len(report.adopted)})
    workload = WorkloadWatcher(daemon.store, settings)  # METALD_WORKLOAD_EXIT lines on consoles
    workload.start()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: log.info("SIGHUP: nothing to reload"))

    async def stopping() -> None:
        await stop.wait()
        await daemon.hub.close()  # end the open streams, or the server's graceful stop waits for them

    options = ServerOptions(address, settings.port, settings.shutdown_grace_seconds)
    app = daemon.tracing.wrap(daemon.app) if daemon.tracing else daemon.app
    try:
        if daemon.metrics is not None:
            await daemon.metrics.start()
        await ApiServer(app, options, tls).serve(stopping())
    finally:
        await workload.close()
        await daemon.hub.close()
        log.info("stopping: VMs keep running")
        if daemon.metrics is not None:
            await daemon.metrics.stop()
        await daemon.engine.close()
        if daemon.engine.network is not None:  # host veths of VMs just deleted, still being destroyed
            await daemon.engine.network.settle(SETTLE_AT_SHUTDOWN_SECONDS)
        if daemon.engine.ctx.snapshots is not None:
            daemon.engine.ctx.snapshots.close()
        daemon.store.close()
        if tls is not None:
            await tls.close()
        if daemon.tracing is not None:
            await asyncio.to_thread(daemon.tracing.shutdown)  # flushes queued spans
