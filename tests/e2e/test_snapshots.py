"""Snapshots with real guests under the jailer, each VM in its own namespace:
hibernate and resume keep guest memory; clones take a new identity and RNG
seed; interrupted snapshots and restores leave nothing that looks usable."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from metald.backends.qemu.snapshot import STATE_FILE, GuestIdentity, overlay_argv_hook
from metald.core.errors import FailedPrecondition, NotFound
from metald.store.snapshots import SnapshotRepository
from tests.support.snapkit import Kit, http_get, wait_http

pytestmark = [pytest.mark.vm, pytest.mark.xdist_group("net")]

STEPS_SAVE = ("stop", "migrate", "disks", "convert", "manifest", "quit")


class Crash(Exception):
    """Stands for metald dying at a step."""


def crash_at(step: str) -> Callable[[str], None]:
    def fault(at: str) -> None:
        if at == step:
            raise Crash(step)

    return fault


@pytest.fixture
async def kit(tmp_path: Path, require_isolated: None, require_image: Path) -> AsyncIterator[Kit]:
    k = Kit(tmp_path, require_image)
    await k.start()
    yield k
    await k.close()


def repo_of(kit: Kit) -> SnapshotRepository:
    return SnapshotRepository(kit.settings.db_path, kit.settings.data_dir / "snapshots")


def qemu_pids(kit: Kit) -> list[int]:
    marker = str(kit.settings.run_dir).encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"qemu-system" in cmdline.split(b"\0")[0] and marker in cmdline:
                pids.append(int(entry.name))
    return pids


async def test_hibernate_resume_and_interrupted_snapshots(kit: Kit) -> None:
    vm = await kit.make_vm("hib-1", kit.draft())
    await kit.cold_boot(vm)
    await wait_http(vm.ip)
    assert len(qemu_pids(kit)) == 1
    assert [http_get(vm.ip, "/cgi-bin/counter") for _ in range(2)] == ["1", "2"]
    repo = repo_of(kit)

    # a failure at any step of a snapshot leaves no row, no files, and the guest running
    for step in STEPS_SAVE:
        directory = repo.begin(f"fail-{step}", name="", source_vm_id="hib-1", customer_id="c", config=b"", spec={})
        kit.snapshots.fault = crash_at(step)
        with pytest.raises(Crash):
            await kit.snapshots.save(vm.spec, directory, stop=True)
        repo.abort(f"fail-{step}")
        assert not directory.exists()
        assert repo.list_snapshots() == []
    kit.snapshots.fault = lambda at: None
    assert http_get(vm.ip, "/cgi-bin/counter") == "3"

    # metald dying mid-snapshot (no abort): the pending row and its files are swept at start
    directory = repo.begin("crashed", name="", source_vm_id=vm.spec.vm_id, customer_id="c", config=b"", spec={})
    kit.snapshots.fault = crash_at("disks")
    with pytest.raises(Crash):
        await kit.snapshots.save(vm.spec, directory, stop=False)
    kit.snapshots.fault = lambda at: None
    directory.mkdir(exist_ok=True)
    (directory / STATE_FILE).write_bytes(b"partial")  # what a killed metald could leave
    with pytest.raises(NotFound):
        repo.get("crashed")
    restarted = repo_of(kit)
    assert restarted.sweep() == ["crashed"]
    assert not directory.exists()
    assert http_get(vm.ip, "/cgi-bin/counter") == "4"

    # hibernate: snapshot, then QEMU quits; nothing answers; resume continues the same guest
    directory = repo.begin("hib", name="", source_vm_id=vm.spec.vm_id, customer_id="c", config=b"", spec={})
    manifest, _ = await kit.snapshots.save(vm.spec, directory, stop=True)
    repo.complete("hib", manifest.to_dict(), manifest.state_bytes, manifest.disk_bytes)
    assert qemu_pids(kit) == []
    assert http_get(vm.ip, "/", timeout=1) is None
    ready_before = vm.spec.console_log.read_bytes().count(b"METALD_GUEST_READY")
    await kit.snapshots.restore(vm.spec, directory, identity=GuestIdentity(), require_ack=False)
    await wait_http(vm.ip)
    assert http_get(vm.ip, "/cgi-bin/counter") == "5"  # in-memory (tmpfs) state survived
    assert vm.spec.console_log.read_bytes().count(b"METALD_GUEST_READY") == ready_before  # not a boot
    (pid,) = qemu_pids(kit)
    jail = kit.jailer.jail_for("qemu", vm.spec.vm_id)
    assert os.readlink(f"/proc/{pid}/root") == str(jail.root)
    assert os.stat(f"/proc/{pid}").st_uid == kit.settings.jailer_uid

    # a restore that fails half-way, or from a corrupted snapshot, leaves no QEMU
    await kit.backend.shutdown(vm.spec.vm_id, force=True, timeout_s=10)
    kit.snapshots.fault = crash_at("identity")
    with pytest.raises(Crash):
        await kit.snapshots.restore(vm.spec, directory, identity=GuestIdentity())
    kit.snapshots.fault = lambda at: None
    assert qemu_pids(kit) == []
    with open(directory / STATE_FILE, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(FailedPrecondition, match="corrupted"):
        await kit.snapshots.restore(vm.spec, directory, identity=GuestIdentity())
    assert qemu_pids(kit) == []


async def test_clones_take_their_own_identity(kit: Kit) -> None:
    draft = kit.draft()
    template = await kit.make_vm("tmpl-1", draft)
    await kit.cold_boot(template)
    await wait_http(template.ip)
    assert http_get(template.ip, "/cgi-bin/counter") == "1"
    repo = repo_of(kit)
    directory = repo.begin("tmpl", name="", source_vm_id="tmpl-1", customer_id="c", config=b"", spec={})
    manifest, _ = await kit.snapshots.save(template.spec, directory, stop=True)  # the template's IP goes quiet
    repo.complete("tmpl", manifest.to_dict(), manifest.state_bytes, manifest.disk_bytes)

    clones = []
    for name in ("clone-a", "clone-b"):
        clone, _ = await kit.clone(directory, name, draft)
        repo.add_user(name, "tmpl")
        clones.append(clone)
    a, b = clones
    assert len({template.ip, a.ip, b.ip}) == 3
    for clone in clones:
        assert http_get(clone.ip, "/") == clone.spec.vm_id  # on its own IP, with its own id
        info = http_get(clone.ip, "/info") or ""
        assert f"hostname={clone.spec.vm_id}" in info
        assert http_get(clone.ip, "/cgi-bin/counter") == "2"  # the template's memory, copied
        console = clone.spec.console_log.read_text(errors="replace")
        assert "METALD_GUEST_IDENTITY ack=" in console and "metald-agent:" not in console  # reseeded, no error
        assert "seed=" not in console  # echo is off: the seed never reaches the log
    assert http_get(template.ip, "/", timeout=1) is None  # no clone answers on the template's IP
    assert http_get(a.ip, "/cgi-bin/random") != http_get(b.ip, "/cgi-bin/random")
    # the clones' disks are overlays: the snapshot's copy is their backing file
    assert all(d.path.suffix == ".qcow2" for d in a.spec.drives)
    with pytest.raises(FailedPrecondition, match="clone-a"):
        repo.delete("tmpl")

    # a clone's later cold boot runs on its own overlays, with its own identity from the kernel args
    await kit.backend.shutdown(a.spec.vm_id, force=True, timeout_s=10)
    await kit.backend.boot(a.spec, argv_hook=overlay_argv_hook(frozenset(d.path for d in a.spec.drives)))
    await wait_http(a.ip, expect="clone-a")
