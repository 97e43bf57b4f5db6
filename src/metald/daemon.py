"""The composition root: settings -> store, backend, network, engine -> server."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
from dataclasses import dataclass

from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig

from metald.api.app import MetaldApp
from metald.api.health import Health
from metald.api.service import VmServiceImpl
from metald.backends.factory import make_backend
from metald.config import Settings
from metald.core.engine import VmEngine
from metald.core.ports import Network
from metald.store.sqlite import Store

log = logging.getLogger(__name__)


@dataclass
class Daemon:
    settings: Settings
    store: Store
    engine: VmEngine
    app: MetaldApp


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


async def build(settings: Settings) -> Daemon:
    store = Store(settings.db_path)
    backend = await make_backend(settings)
    network: Network | None = None
    if settings.network_enabled:
        from metald.network.manager import NetworkManager

        network = NetworkManager(settings, store)
    engine = VmEngine(settings, store, backend, network)

    async def store_check() -> tuple[bool, str]:
        store.ping()
        return True, f"sqlite schema v{store.schema_version}"

    checks = {"store": store_check, "backend": backend.ping}
    if network is not None:
        checks["network"] = network.check
    health = Health(checks, backend.name)
    app = MetaldApp(VmServiceImpl(engine, settings), health, settings.max_request_bytes)
    return Daemon(settings, store, engine, app)


async def run(settings: Settings) -> None:
    address = bind_address(settings)
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    daemon = await build(settings)
    report = await daemon.engine.start()
    log.info("metald ready", extra={"port": settings.port, "adopted": len(report.adopted)})

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: log.info("SIGHUP: nothing to reload"))

    config = HypercornConfig()
    host = f"[{address}]" if ":" in address else address
    config.bind = [f"{host}:{settings.port}"]
    config.graceful_timeout = settings.shutdown_grace_seconds
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    try:
        await serve(daemon.app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]
    finally:
        log.info("stopping: VMs keep running")
        await daemon.engine.close()
        daemon.store.close()
