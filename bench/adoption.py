"""Reconcile/adoption time at start-up with 100 and 1000 stored running VMs.

What is real: the SQLite store with one RUNNING row per VM (spec, network
allocation, VMM handle), each VM's network (namespace ``fc-<id>``, veth pair on
``br-vms``, TAP, proxy ARP, routes, neighbours, nft elements), and metald's
whole start-up path: the handle check (pid + start time + command line with the
QMP socket + its hash), a pidfd watch per VM, the network plan re-applied per
VM (everything present, so nothing is recreated), the leftover sweeps
(namespaces, links, nft, jails, run directories, stray VMM processes), and
the QMP connection and ``query-status`` per VM, which run after reconcile
(``VmEngine.wait_settled``) and are timed separately.

What is a STAND-IN: the VMM. Booting 1000 QEMU guests under TCG on two cores
is not possible, so each VM's "VMM" is a tiny C process (compiled here with
gcc, about 0.3 MiB RSS) whose command line carries the VM's
``-qmp unix:<run_dir>/<vm_id>/qmp.sock`` marker and which answers QMP on that
socket (greeting, ``qmp_capabilities``, ``query-status``, ``stop``/``cont``).
The jailer is off (stand-ins have no cgroup; with it on, adoption only checks
the VMM's cgroup membership).

Two measurements per size, each over METALD_BENCH_ADOPT_RESTARTS restarts:

* reconcile: ``VmEngine.start()`` in-process with a fresh store connection,
  backend, network manager and engine per restart (what a restart does after
  imports), via ``ReconcileReport.seconds`` and wall time; then the time
  until every adopted VMM's QMP is attached and its run state read (every VM
  must still be RUNNING then);
* serve: a real ``metald serve`` started on the same state and SIGKILLed after
  each start; spawn to healthy (includes interpreter start and imports).

Sizes: METALD_BENCH_ADOPT_LEVELS (100,1000), METALD_BENCH_ADOPT_RESTARTS (5).
Run: ``tests/isolated.sh .venv/bin/python -m bench.adoption`` (prints the
figure as JSON, then as a Markdown table; writes bench/out/adoption.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import Dist, Figure, command_line, env_int, env_ints, load_average, require_isolated, write_figure  # noqa: E402
from metald.backends import procfs  # noqa: E402
from metald.backends.qemu.backend import QemuBackend  # noqa: E402
from metald.backends.qemu.command import argv_hash, qmp_socket_path  # noqa: E402
from metald.backends.qemu.handle import VmmHandle  # noqa: E402
from metald.config import Settings  # noqa: E402
from metald.core.engine import VmEngine  # noqa: E402
from metald.core.models import VmDraft, VmState  # noqa: E402
from metald.core.plan import Plan  # noqa: E402
from metald.core.specs import draft_to_dict  # noqa: E402
from metald.network.manager import NetworkManager  # noqa: E402
from metald.store.sqlite import Store  # noqa: E402

STAND_IN_C = r"""
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

/* A QMP stand-in for benchmarks: NOT a VMM. Usage: standin ... -qmp unix:PATH[,opts] ... */
static int paused;

static void field(const char *obj, size_t len, const char *key, char *out, size_t cap) {
    out[0] = 0;
    const char *p = memmem(obj, len, key, strlen(key));
    if (!p) return;
    p = memchr(p + strlen(key), '"', obj + len - (p + strlen(key)));
    if (!p) return;
    const char *e = memchr(p + 1, '"', obj + len - (p + 1));
    if (!e || (size_t)(e - p - 1) >= cap) return;
    memcpy(out, p + 1, e - p - 1);
    out[e - p - 1] = 0;
}

static void reply(int fd, const char *obj, size_t len) {
    char cmd[64], id[128], ret[160] = "{}", out[512];
    field(obj, len, "\"execute\"", cmd, sizeof cmd);
    field(obj, len, "\"id\"", id, sizeof id);
    if (!strcmp(cmd, "query-status"))
        snprintf(ret, sizeof ret, "{\"status\": \"%s\", \"singlestep\": false, \"running\": %s}",
                 paused ? "paused" : "running", paused ? "false" : "true");
    else if (!strcmp(cmd, "stop")) paused = 1;
    else if (!strcmp(cmd, "cont")) paused = 0;
    int n = id[0] ? snprintf(out, sizeof out, "{\"return\": %s, \"id\": \"%s\"}\r\n", ret, id)
                  : snprintf(out, sizeof out, "{\"return\": %s}\r\n", ret);
    if (write(fd, out, n) < 0) return;
    if (!strcmp(cmd, "quit")) exit(0);
}

static void serve(int fd) {
    static const char greeting[] =
        "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 7}, "
        "\"package\": \"metald bench stand-in\"}, \"capabilities\": []}}\r\n";
    char buf[8192];
    size_t have = 0;
    if (write(fd, greeting, sizeof greeting - 1) < 0) return;
    for (;;) {
        ssize_t got = read(fd, buf + have, sizeof buf - have);
        if (got <= 0) return;
        have += got;
        size_t start = 0, done = 0;
        int depth = 0, str = 0, esc = 0;
        for (size_t i = 0; i < have; i++) {
            char c = buf[i];
            if (str) { if (esc) esc = 0; else if (c == '\\') esc = 1; else if (c == '"') str = 0; continue; }
            if (c == '"') str = 1;
            else if (c == '{') { if (depth++ == 0) start = i; }
            else if (c == '}' && depth > 0 && --depth == 0) { reply(fd, buf + start, i - start + 1); done = i + 1; }
        }
        memmove(buf, buf + done, have - done);
        have -= done;
        if (have == sizeof buf) have = 0;
    }
}

int main(int argc, char **argv) {
    char path[108] = "";
    for (int i = 0; i < argc; i++)
        if (!strncmp(argv[i], "unix:", 5)) {
            size_t n = strcspn(argv[i] + 5, ",");
            if (n >= sizeof path) return 2;
            memcpy(path, argv[i] + 5, n);
            path[n] = 0;
        }
    if (!path[0]) return 2;
    signal(SIGPIPE, SIG_IGN);
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strcpy(addr.sun_path, path);
    unlink(path);
    if (s < 0 || bind(s, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(s, 8) < 0) return 3;
    for (;;) {
        int c = accept4(s, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0) continue;
        serve(c);
        close(c);
    }
}
"""


def build_stand_in(work: Path) -> Path:
    if shutil.which("gcc") is None:
        sys.exit("bench/adoption.py needs gcc to build its QMP stand-in (apt-get install gcc)")
    src, exe = work / "standin.c", work / "qmp-standin"
    src.write_text(STAND_IN_C)
    subprocess.run(["gcc", "-O2", "-s", "-o", str(exe), str(src)], check=True)
    return exe


class Fleet:
    """The stored VMs, their networks and their stand-in VMMs."""

    def __init__(self, tmp: Path, image: Path, exe: Path) -> None:
        self.tmp = tmp
        self.exe = exe
        self.settings = Settings(  # type: ignore[call-arg]
            data_dir=tmp / "data", run_dir=tmp / "run", image_dir=image, jailer_enabled=False,
            jailer_chroot_dir=tmp / "jail", network_enabled=True,
        )
        self.settings.run_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.settings.db_path)
        self.network = NetworkManager(self.settings, self.store)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.draft = VmDraft(1, 128 << 20, image / "vmlinuz", None, "console=ttyS0", (), None)

    async def grow(self, count: int) -> float:
        """Add VMs up to ``count``; return the seconds it took."""
        started = time.monotonic()
        await self.network.setup_host()
        gate = asyncio.Semaphore(16)
        await asyncio.gather(*(self._add(f"bench-{i:04d}", gate) for i in range(len(self.procs), count)))
        return time.monotonic() - started

    async def _add(self, vm_id: str, gate: asyncio.Semaphore) -> None:
        async with gate:
            self.store.insert_vm(vm_id, "bench", int(VmState.RUNNING), b"", draft_to_dict(self.draft), "qemu", 1,
                                 128 << 20, {})
            alloc = await self.network.allocate(vm_id, None)
            self.store.update_vm(vm_id, network=self.network.allocation_to_dict(alloc))
            await Plan("bench.network", self.network.setup_steps(alloc)).run()
            run_dir = self.settings.run_dir / vm_id
            run_dir.mkdir(mode=0o750)
            sock = qmp_socket_path(run_dir)
            argv = [str(self.exe), "-name", f"guest={vm_id}", "-qmp", f"unix:{sock},server=on,wait=off"]
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    start_new_session=True)
            self.procs.append(proc)
            while not sock.exists():
                await asyncio.sleep(0.005)
            stat = procfs.read_stat(proc.pid)
            cmdline = procfs.read_cmdline(proc.pid) or []
            assert stat is not None
            handle = VmmHandle(proc.pid, stat.start_time, str(sock), "tcg", argv_hash(cmdline))
            self.store.update_vm(vm_id, handle=handle.to_dict(), status={"booted_at": time.time()})

    async def restart_in_process(self) -> tuple[float, float, float, int]:
        """(reconcile seconds, start() wall seconds, seconds from start() until every
        QMP is attached, VMs adopted) of one fresh engine."""
        store = Store(self.settings.db_path)
        engine = VmEngine(self.settings, store, QemuBackend(self.settings, None), NetworkManager(self.settings, store))
        try:
            started = time.monotonic()
            report = await engine.start()
            wall = time.monotonic() - started
            await engine.wait_settled()
            settled = time.monotonic() - started
            if report.marked_shutdown or report.failed:
                raise RuntimeError(f"not all adopted: {report}")
            stopped = [row.vm_id for row in store.all_vms() if row.state != VmState.RUNNING]
            if stopped:
                raise RuntimeError(f"not RUNNING once attached: {stopped[:5]}")
            return report.seconds, wall, settled, len(report.adopted)
        finally:
            await engine.close()
            store.close()

    def restart_serve(self) -> tuple[float, float, int]:
        """(spawn-to-healthy seconds, reconcile seconds, adopted) of a real `metald serve`, then SIGKILL."""
        import httpx

        port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("UNKEY_METALD_")}
        env.update(
            METALD_ENV_FILE=str(self.tmp / "none.env"), UNKEY_METALD_PORT=str(port),
            UNKEY_METALD_DATA_DIR=str(self.settings.data_dir), UNKEY_METALD_RUN_DIR=str(self.settings.run_dir),
            UNKEY_METALD_IMAGE_DIR=str(self.settings.image_dir), UNKEY_METALD_JAILER_ENABLED="false",
            UNKEY_METALD_JAILER_CHROOT_DIR=str(self.tmp / "jail"), UNKEY_METALD_BACKEND="qemu",
            UNKEY_METALD_OTEL_ENABLED="false",
        )
        log = self.tmp / "serve.log"
        log.write_text("")
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "metald.cli.main", "serve"], env=env,
                                stdout=subprocess.DEVNULL, stderr=log.open("ab"), start_new_session=True)
        try:
            with httpx.Client(timeout=1) as http:
                while True:
                    if proc.poll() is not None:
                        raise RuntimeError("metald exited:\n" + log.read_text()[-3000:])
                    try:
                        if http.get(f"http://127.0.0.1:{port}/_/health").status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    if time.monotonic() - started > 300:
                        raise RuntimeError("metald did not become healthy")
                    time.sleep(0.01)
            healthy = time.monotonic() - started
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        records = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        done = [r for r in records if r.get("msg") == "reconciled"][-1]
        return healthy, float(done["seconds"]), int(done["adopted"])

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.wait(10)
        self.store.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def main_async(levels: list[int], restarts: int) -> Figure:
    fig = Figure(
        key="adoption",
        title="Reconcile/adoption at start-up: stored RUNNING VMs with real networks and QMP stand-in VMMs",
        command=command_line(),
        columns=[
            "stored running VMs", "set-up s (not timed below)", "reconcile ms (median / p95)",
            "engine.start() ms (median / p95)", "ms per VM (median)", "until all QMP attached ms (median / p95)",
            "metald serve spawn-to-healthy ms (median / p95)",
            "reconcile ms inside serve (median / p95)",
        ],
        load_before=list(load_average()),
        notes=[
            "VMMs are stand-ins (a tiny C process per VM answering QMP on the VM's socket, with the VM's "
            "-qmp marker in its command line); store rows, handles, namespaces, veths, TAPs, routes, "
            "neighbours and nft elements are real. Jailer off. Each restart is a fresh engine (or a fresh "
            "`metald serve`) on the same state; every restart must adopt every VM.",
            "Reconcile adopts on the VMM's identity (pid, start time, command line); the QMP connection and "
            "query-status of every VMM follow in the background: 'until all QMP attached' is from the call of "
            "start() until that is done for every VM (all must still be RUNNING then).",
        ],
    )
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="metald-bench-adopt-"))
    image = tmp / "image"
    image.mkdir()
    for name in ("vmlinuz", "initramfs.cpio.gz", "rootfs.ext4"):
        (image / name).write_bytes(b"x")
    (image / "cmdline").write_text("console=ttyS0\n")
    fleet = Fleet(tmp, image, build_stand_in(tmp))
    try:
        for level in sorted(levels):
            setup_s = await fleet.grow(level)
            recon, wall, attached = [], [], []
            for _ in range(restarts):
                seconds, total, settled, adopted = await fleet.restart_in_process()
                assert adopted == level, (adopted, level)
                recon.append(seconds)
                wall.append(total)
                attached.append(settled)
            healthy, inside = [], []
            for _ in range(restarts):
                h, r, adopted = await asyncio.to_thread(fleet.restart_serve)
                assert adopted == level, (adopted, level)
                healthy.append(h)
                inside.append(r)
            rd, wd, ad, hd, idist = (Dist.of_seconds(x) for x in (recon, wall, attached, healthy, inside))
            fig.rows.append([
                str(level), f"{setup_s:.1f}", f"{rd.median:.0f} / {rd.p95:.0f}", f"{wd.median:.0f} / {wd.p95:.0f}",
                f"{rd.median / level:.2f}", f"{ad.median:.0f} / {ad.p95:.0f}", f"{hd.median:.0f} / {hd.p95:.0f}",
                f"{idist.median:.0f} / {idist.p95:.0f}",
            ])
            fig.extra[f"level_{level}"] = {
                "reconcile": asdict(rd), "engine_start": asdict(wd), "qmp_attached": asdict(ad),
                "serve_healthy": asdict(hd),
                "serve_reconcile": asdict(idist), "restarts": restarts, "setup_seconds": setup_s,
            }
    finally:
        fleet.close()
        shutil.rmtree(tmp, ignore_errors=True)
    fig.load_after = list(load_average())
    fig.seconds = time.monotonic() - started
    return fig


def markdown(fig: Figure) -> str:
    lines = [f"### {fig.title}", "", "| " + " | ".join(fig.columns) + " |", "|" + "---|" * len(fig.columns)]
    lines += ["| " + " | ".join(row) + " |" for row in fig.rows]
    lines += ["", *fig.notes, "", f"`{fig.command}` (load {fig.load_before} -> {fig.load_after}, {fig.seconds:.0f} s)"]
    return "\n".join(lines)


def main() -> None:
    require_isolated()
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    levels = env_ints("METALD_BENCH_ADOPT_LEVELS", [100, 1000])
    restarts = env_int("METALD_BENCH_ADOPT_RESTARTS", 5)
    fig = asyncio.run(main_async(levels, restarts))
    write_figure(fig)
    print(json.dumps(asdict(fig), indent=2))
    print()
    print(markdown(fig))


if __name__ == "__main__":
    main()
