"""Each VM's own copy-on-write root disk over a cached image, and the draft
changes that boot it with metald-init.

QEMU: a qcow2 overlay ``rootfs.qcow2`` whose backing file is the relative name
``rootfs-base.ext4``, a symlink in the VM's run directory to the cached image.
Relative, so it resolves both outside a jail (through the symlink) and inside
one (the jailer places ``rootfs-base.ext4`` next to ``rootfs.qcow2`` in the
chroot, read-only). QEMU opens a backing file read-only: the guest's writes
land in the overlay only. Firecracker takes raw files: ``rootfs.ext4`` is a
reflink copy where the filesystem can, else a sparse copy. Either way the
symlink also tells the cache that the image is in use.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import replace
from pathlib import Path

from metald.config import Settings
from metald.core.models import Drive, VmDraft
from metald.images import guestconfig
from metald.images.store import BASE_LINK, ImageStore
from metald.images.tools import need, run

OVERLAY = "rootfs.qcow2"
COPY = "rootfs.ext4"
INIT_PATH = "/.metald/init"
FIELD = "docker_image"


def uses_overlay(backend: str) -> bool:
    return backend != "firecracker"


class VmImages:
    def __init__(self, settings: Settings, store: ImageStore | None = None) -> None:
        self.settings = settings
        self.store = store or ImageStore(settings)

    async def prepare(self, vm_id: str, draft: VmDraft, backend: str, run_dir: Path) -> VmDraft:
        metadata = dict(draft.metadata)
        args = draft.kernel_args.split()
        extra = guestconfig.kernel_arg(metadata)
        if extra:
            args.append(extra)
        initrd = draft.initrd_path
        bundled = self.settings.image_dir
        if draft.kernel_path == (bundled / "vmlinuz").resolve() and initrd == (bundled / "initramfs.cpio.gz").resolve():
            initrd = await self.store.boot.initramfs(initrd)
        else:  # the caller's kernel: it must mount /dev/vda itself (virtio built in, or its own initrd)
            args += ["root=/dev/vda", "rw", f"init={INIT_PATH}"]
        overlay = uses_overlay(backend)
        disk = Drive("rootfs", run_dir / (OVERLAY if overlay else COPY), False, True)
        return replace(
            draft,
            initrd_path=initrd,
            kernel_args=" ".join(args),
            drives=(disk, *(d for d in draft.drives if not d.is_root)),
            extra_files=(run_dir / BASE_LINK,) if overlay else (),
        )

    async def attach(self, vm_id: str, draft: VmDraft, run_dir: Path) -> None:
        image = await self.store.resolve(draft.image, FIELD)
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        link = run_dir / BASE_LINK
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        os.symlink(image.path, link)
        root = next(d for d in draft.drives if d.is_root)
        tmp = root.path.with_name(".tmp." + root.path.name)
        if root.path.name == OVERLAY:
            argv = [need("qemu-img", "qemu-utils"), "create", "-q", "-f", "qcow2", "-F", "raw"]
            argv += ["-b", BASE_LINK, tmp.name]
            await run(argv, cwd=str(run_dir))
        else:
            await run(["cp", "--reflink=auto", "--sparse=always", str(image.path), str(tmp)])
        os.chmod(tmp, 0o600)
        os.replace(tmp, root.path)

    async def detach(self, vm_id: str, run_dir: Path) -> None:
        for name in (OVERLAY, COPY, BASE_LINK, ".tmp." + OVERLAY, ".tmp." + COPY):
            with contextlib.suppress(FileNotFoundError):
                (run_dir / name).unlink()
        with contextlib.suppress(OSError):
            run_dir.rmdir()  # only if the disk was all it held (a create being undone)

    def exit_reason(self, console_log: Path) -> str | None:
        return workload_exit(console_log)


START_MARK = b"METALD_IMAGE_START"
EXIT_MARK = b"METALD_WORKLOAD_EXIT "
TAIL_BYTES = 256 << 10


def workload_exit(console_log: Path) -> str | None:
    """ "workload exited with code N" if metald-init's last line of the newest boot says so."""
    try:
        with open(console_log, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - TAIL_BYTES))
            tail = fh.read()
    except OSError:
        return None
    start = tail.rfind(START_MARK)
    end = tail.rfind(EXIT_MARK)
    if end < 0 or end < start:
        return None
    line = tail[end + len(EXIT_MARK) :].split(b"\n", 1)[0].decode(errors="replace").strip()
    key, _, value = line.partition("=")
    if key == "code":
        return f"workload exited with code {value}"
    if key == "signal":
        return f"workload killed by signal {value}"
    return f"workload could not start: {value}"
