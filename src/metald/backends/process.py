"""Starting a VMM detached from metald and noticing when it exits (every backend).

The VMM gets its own session (so signals to metald's process group and a
metald restart leave it alone) and writes stdout/stderr to a per-VM log.
Exits are noticed through a pidfd, which works for children and for VMMs
adopted after a restart; children are reaped to learn their exit status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def spawn(argv: list[str], log_path: Path, stdout_path: Path | None = None) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a new session, stdin on /dev/null and stderr to ``log_path``.

    stdout goes to ``stdout_path`` (e.g. Firecracker's serial console) or, when
    None, to the same log.
    """
    with contextlib.ExitStack() as stack:
        err = stack.enter_context(open(log_path, "ab"))
        out = stack.enter_context(open(stdout_path, "ab")) if stdout_path is not None else err
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
            close_fds=True,
        )


def describe_status(returncode: int | None) -> str:
    """Human text for a Popen-style return code (negative = killed by signal)."""
    if returncode is None:
        return "exited (exit status unknown: not a child of this metald)"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by signal {name}"
    return f"exit code {returncode}"


class ProcessWatch:
    """Calls ``on_exit(returncode)`` once, soon after the process ends.

    ``returncode`` is None when the process is not our child (adopted).
    """

    def __init__(
        self,
        pid: int,
        popen: subprocess.Popen[bytes] | None,
        on_exit: Callable[[int | None], None],
    ) -> None:
        self.pid = pid
        self._popen = popen
        self._on_exit = on_exit
        self._fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.exited = asyncio.Event()
        self.returncode: int | None = None

    def start(self, pidfd: int | None = None) -> None:
        """Watch through ``pidfd`` (taken over) or a pidfd opened here."""
        self._loop = asyncio.get_running_loop()
        if pidfd is None:
            try:
                pidfd = os.pidfd_open(self.pid)
            except ProcessLookupError:
                self._loop.call_soon(self._fire)
                return
        self._fd = pidfd
        self._loop.add_reader(self._fd, self._fire)

    @property
    def alive(self) -> bool:
        return not self.exited.is_set()

    def _fire(self) -> None:
        if self.exited.is_set():
            return
        self._detach()
        if self._popen is not None:
            # Reaps the child; negative values mean "killed by that signal".
            self.returncode = self._popen.poll()
            if self.returncode is None:  # readable pidfd but not yet waitable
                self.returncode = self._popen.wait()
        self.exited.set()
        self._on_exit(self.returncode)

    async def wait(self, timeout: float) -> bool:
        """True if the process exited within ``timeout`` seconds."""
        try:
            await asyncio.wait_for(self.exited.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def kill(self, sig: int = signal.SIGKILL, group: bool = True) -> None:
        """Signal the process through its pidfd (never a reused pid) and, with
        ``group``, its process group (QEMU's helpers; not Firecracker's launcher,
        which must outlive the VMM it reaps)."""
        if self.exited.is_set():
            return
        if self._fd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._fd, sig)
        if not group:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(self.pid) == self.pid:
                os.killpg(self.pid, sig)

    def _detach(self) -> None:
        if self._fd is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(self._fd)
        os.close(self._fd)
        self._fd = None

    def close(self) -> None:
        """Stop watching without touching the process."""
        self._detach()
