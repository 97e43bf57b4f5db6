"""One QMP connection to one QEMU: commands, and the events metald cares about."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, QMPClient, QMPError
from qemu.qmp.protocol import Runstate

from metald.backends.process import describe_status
from metald.core.bounds import describe
from metald.core.errors import BackendError

log = logging.getLogger(__name__)

# SHUTDOWN event reasons (QAPI ShutdownCause) in words.
SHUTDOWN_REASONS = {
    "guest-shutdown": "guest poweroff",
    "guest-reset": "guest reset",
    "guest-panic": "guest panic",
    "host-qmp-quit": "quit via QMP",
    "host-qmp-system-reset": "reset via QMP",
    "host-signal": "terminated by a signal to QEMU",
    "host-ui": "closed from the QEMU UI",
    "host-error": "QEMU host error",
    "subsystem-reset": "subsystem reset",
    "snapshot-load": "snapshot load",
}

WATCHED_EVENTS = ("SHUTDOWN", "STOP", "RESUME", "RESET", "GUEST_PANICKED")


class QmpSession:
    """A connected QMPClient plus a task recording lifecycle events."""

    def __init__(self, name: str, socket_path: Path) -> None:
        self.name = name
        self.socket_path = socket_path
        self.client: QMPClient | None = None
        self.shutdown_reason: str | None = None  # raw ShutdownCause of the last SHUTDOWN
        self.on_stop: Callable[[], None] | None = None
        self._task: asyncio.Task[None] | None = None

    async def connect(self, timeout: float, alive: Callable[[], bool]) -> None:
        """Connect, retrying while QEMU creates its socket; give up if QEMU dies."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last: Exception | None = None
        while True:
            if not self.socket_path.exists():  # not created yet: no noisy failed connect
                last = FileNotFoundError(f"{self.socket_path} does not exist")
            else:
                client = QMPClient(self.name)
                try:
                    await asyncio.wait_for(client.connect(str(self.socket_path)), timeout=min(5.0, timeout))
                except (QMPError, OSError, TimeoutError) as exc:
                    last = exc
                    with contextlib.suppress(Exception):
                        await client.disconnect()
                else:
                    self._attach(client)
                    return
            if not alive():
                raise BackendError(f"QEMU exited before its QMP socket answered: {_why(last)}")
            if loop.time() >= deadline:
                raise BackendError(f"QMP socket {self.socket_path} did not answer within {timeout:g}s: {_why(last)}")
            await asyncio.sleep(0.05)

    def _attach(self, client: QMPClient) -> None:
        self.client = client
        listener = EventListener(WATCHED_EVENTS)
        client.register_listener(listener)
        self._task = asyncio.create_task(self._watch(listener))

    @property
    def connected(self) -> bool:
        return self.client is not None and self.client.runstate == Runstate.RUNNING

    async def execute(self, cmd: str, args: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
        if self.client is None or not self.connected:
            raise BackendError(f"QMP {cmd}: not connected to QEMU")
        try:
            return await asyncio.wait_for(self.client.execute(cmd, args), timeout)
        except TimeoutError:
            raise BackendError(f"QMP {cmd}: no answer within {timeout:g}s") from None
        except (QMPError, OSError, EOFError) as exc:
            raise BackendError(f"QMP {cmd} failed: {exc}") from exc

    async def status(self, timeout: float = 10.0) -> str:
        result = await self.execute("query-status", timeout=timeout)
        return str(result.get("status", "unknown"))

    async def drained(self, timeout: float) -> None:
        """Wait until the reader has hit EOF, so every event QEMU sent was seen."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.connected and loop.time() < deadline:
            await asyncio.sleep(0.02)

    async def _watch(self, listener: EventListener) -> None:
        async for event in listener:
            name = event.get("event")
            raw = event.get("data")
            data: dict[str, Any] = raw if isinstance(raw, dict) else {}
            log.debug("qmp %s: event %s %s", self.name, name, data)
            if name == "SHUTDOWN":
                self.shutdown_reason = str(data.get("reason", "unknown"))
            elif name == "GUEST_PANICKED":
                self.shutdown_reason = "guest-panic"
            elif name == "STOP" and self.on_stop is not None:
                self.on_stop()

    async def close(self) -> None:
        """Drop the connection; QEMU keeps running."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.disconnect()
            self.client = None


def _why(exc: BaseException | None) -> str:
    if exc is None:
        return "no attempt"
    if isinstance(exc, TimeoutError):
        return "no QMP greeting (the VMM is alive but does not answer)"
    return describe(exc)


def describe_shutdown(reason: str | None) -> str | None:
    if reason is None:
        return None
    return SHUTDOWN_REASONS.get(reason, reason)


def exit_reason(failure: str | None, shutdown_cause: str | None, returncode: int | None) -> str:
    """One line on how a QEMU ended, from metald's own verdict, QMP and the exit status."""
    status = describe_status(returncode)
    if failure:
        return f"{failure} ({status})" if returncode is not None else failure
    event = describe_shutdown(shutdown_cause)
    if event is None:
        return status
    if returncode is None or returncode == 0:
        return event
    return f"{event} ({status})"
