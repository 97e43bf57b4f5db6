"""Run the real ASGI app over HTTP (metald's server: HTTP/1.1 + h2c, or mTLS) in a thread."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metald.api.app import MetaldApp
from metald.api.events import EventServiceImpl, StreamingApp
from metald.api.health import Health
from metald.api.server import ApiServer, ServerOptions
from metald.api.service import VmServiceImpl
from metald.api.tls import open_tls
from metald.config import Settings
from metald.core.engine import VmEngine
from metald.core.lifecycle import ReconcileReport
from metald.store.snapshots import SnapshotRepository
from metald.store.sqlite import Store
from metald.streams.hub import EventHub


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    url: str
    port: int
    engine: VmEngine
    store: Store
    backend: Any
    loop: asyncio.AbstractEventLoop
    tls: Any = None  # the server's metald.api.tls.ServerTls when served with tls=True
    hub: EventHub | None = None

    def call(self, coro: Any) -> Any:
        """Run a coroutine on the server's loop (e.g. to poke the engine)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)


def make_settings(tmp: Path, **overrides: Any) -> Settings:
    image = tmp / "image"
    image.mkdir(exist_ok=True)
    for name in ("vmlinuz", "initramfs.cpio.gz", "rootfs.ext4"):
        (image / name).write_bytes(b"x")
    (image / "cmdline").write_text("console=ttyS0\n")
    values: dict[str, Any] = {
        "data_dir": tmp / "data",
        "run_dir": tmp / "run",
        "image_dir": image,
        "network_enabled": False,
        "jailer_enabled": False,
    }
    values.update(overrides)
    return Settings(**values)


@contextmanager
def serve_in_thread(
    settings: Settings,
    backend: Any,
    network: Any = None,
    *,
    wrap_app: Callable[[Any], Any] | None = None,
    on_start: Callable[[VmEngine, ReconcileReport], Awaitable[None]] | None = None,
    on_stop: Callable[[], Awaitable[None]] | None = None,
    tls: bool = False,
) -> Iterator[RunningServer]:
    """Serve on a free loopback port; the optional hooks wrap the ASGI app, run after
    the engine started (with its reconcile report) and after the server stopped. With tls=True
    it serves https per settings.tls_mode, callers identified by their client certificates."""
    loop = asyncio.new_event_loop()
    store = Store(settings.db_path)
    stop = asyncio.Event()
    port = free_port()
    ready = threading.Event()
    holder: dict[str, Any] = {}

    async def main() -> None:
        server_tls = await open_tls(settings) if tls else None
        holder["tls"] = server_tls
        snapshots = SnapshotRepository(settings.db_path, settings.data_dir / "snapshots")
        snapshots.sweep()
        engine = VmEngine(settings, store, backend, network, snapshots=snapshots)
        holder["engine"] = engine
        hub = holder["hub"] = EventHub(store, settings)
        await hub.start()
        report = await engine.start()
        if on_start is not None:
            await on_start(engine, report)

        async def store_check() -> tuple[bool, str]:
            return True, "ok"

        app = MetaldApp(
            VmServiceImpl(engine, settings),
            Health({"store": store_check, "backend": backend.ping}, backend.name),
            settings.max_request_bytes,
            peer_identity=server_tls.peer_identity if server_tls is not None else None,
            events=StreamingApp(EventServiceImpl(hub, settings), settings.max_request_bytes),
        )
        served = wrap_app(app) if wrap_app is not None else app
        async def stopping() -> None:
            await stop.wait()
            await hub.close()

        api = ApiServer(served, ServerOptions("127.0.0.1", port, grace_seconds=1), server_tls)
        task = asyncio.ensure_future(api.serve(stopping()))
        for _ in range(200):
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                break
            except OSError:
                await asyncio.sleep(0.02)
        ready.set()
        await task
        if server_tls is not None:
            await server_tls.close()
        snapshots.close()
        if on_stop is not None:
            await on_stop()

    thread = threading.Thread(target=lambda: loop.run_until_complete(main()), daemon=True)
    thread.start()
    assert ready.wait(20), "server did not start"
    try:
        scheme = "https" if tls else "http"
        yield RunningServer(
            f"{scheme}://127.0.0.1:{port}", port, holder["engine"], store, backend, loop, holder["tls"], holder["hub"]
        )
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        store.close()
