"""The image cache: one converted root filesystem per manifest digest.

Layout of ``UNKEY_METALD_IMAGE_CACHE_DIR``::

    images/<hex>/rootfs.ext4   the root filesystem (read-only, mode 0444)
    images/<hex>/meta.json     digest, references, sizes, the image's config
    refs/<key>.json            reference -> digest (a tag as last pulled)
    boot/                      metald-init and the initramfs that starts it
    tmp/                       work directories (removed at start)

An image directory appears by one rename of a finished directory, so a crash
during a pull or conversion leaves only a work directory that the next start
removes; nothing half-made is ever used. One lock per reference makes
concurrent requests for a new image pull and convert it once, and a semaphore
bounds the pulls running at once. After every new image the cache is cut to
``UNKEY_METALD_IMAGE_CACHE_BYTES`` by evicting least recently used images that
no VM uses (a VM's disk links to its image: see disk.py).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metald.config import Settings
from metald.core.errors import FailedPrecondition, NotFound, Unavailable
from metald.images import convert, layers
from metald.images.bootfiles import BootFiles
from metald.images.reference import ImageRef, parse
from metald.images.registry import Puller

log = logging.getLogger(__name__)

ROOTFS = "rootfs.ext4"
META = "meta.json"
BASE_LINK = "rootfs-base.ext4"  # in a VM's run directory: a symlink to the image its disk is made from


@dataclass
class CachedImage:
    digest: str
    path: Path  # the ext4 root filesystem
    refs: list[str] = field(default_factory=list)
    size_bytes: int = 0  # apparent size of the filesystem
    disk_bytes: int = 0  # blocks it takes on the host
    created_at: float = 0.0
    last_used: float = 0.0
    in_use_by: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "refs": self.refs,
            "path": str(self.path),
            "size_bytes": self.size_bytes,
            "disk_bytes": self.disk_bytes,
            "created_at": self.created_at,
            "last_used": self.last_used,
            "in_use_by": self.in_use_by,
        }


def _hex(digest: str) -> str:
    return digest.split(":", 1)[1]


class ImageStore:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = settings.image_cache_dir
        self.images_dir = self.root / "images"
        self.refs_dir = self.root / "refs"
        self.tmp_dir = self.root / "tmp"
        self.boot = BootFiles(self.root / "boot")
        self.puller = Puller(settings)
        self._locks: dict[str, asyncio.Lock] = {}
        self._pulls = asyncio.Semaphore(settings.image_concurrent_pulls)
        self._ready = False

    def _setup(self) -> None:
        if self._ready:
            return
        for d in (self.root, self.images_dir, self.refs_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o755)
        os.chmod(self.root, 0o755)  # jailed VMMs reach the images through hard links or binds
        for leftover in self.tmp_dir.iterdir():  # a pull or conversion cut short
            shutil.rmtree(leftover, ignore_errors=True)
        self._ready = True

    # --- lookups ---------------------------------------------------------------
    def _ref_file(self, ref: ImageRef) -> Path:
        return self.refs_dir / f"{hashlib.sha256(str(ref).encode()).hexdigest()[:32]}.json"

    def _load(self, digest: str) -> CachedImage | None:
        directory = self.images_dir / _hex(digest)
        try:
            meta = json.loads((directory / META).read_text())
            st = (directory / ROOTFS).stat()
        except (OSError, ValueError):
            return None
        return CachedImage(
            digest=digest,
            path=directory / ROOTFS,
            refs=list(meta.get("refs", [])),
            size_bytes=st.st_size,
            disk_bytes=st.st_blocks * 512,
            created_at=float(meta.get("created_at", 0)),
            last_used=(directory / META).stat().st_mtime,
        )

    def lookup(self, ref: ImageRef) -> CachedImage | None:
        if ref.digest:
            return self._load(ref.digest)
        try:
            digest = json.loads(self._ref_file(ref).read_text())["digest"]
        except (OSError, ValueError, KeyError):
            return None
        return self._load(str(digest))

    def users(self) -> dict[str, list[str]]:
        """digest -> the VMs whose disks link to it (run dirs, and ones being deleted)."""
        out: dict[str, list[str]] = {}
        run_dir = self.settings.run_dir
        if not run_dir.is_dir():
            return out
        for entry in run_dir.iterdir():
            link = entry / BASE_LINK
            with contextlib.suppress(OSError):
                target = Path(os.readlink(link))
                if target.parent.parent == self.images_dir:
                    out.setdefault("sha256:" + target.parent.name, []).append(entry.name)
        return out

    def list(self) -> builtins.list[CachedImage]:
        self._setup()
        users = self.users()
        images = []
        for directory in sorted(self.images_dir.iterdir()):
            image = self._load("sha256:" + directory.name)
            if image is not None:
                image.in_use_by = sorted(users.get(image.digest, []))
                images.append(image)
        return images

    def touch(self, image: CachedImage) -> None:
        with contextlib.suppress(OSError):
            os.utime(image.path.parent / META)
        image.last_used = time.time()

    # --- pulling ---------------------------------------------------------------
    async def resolve(self, text: str, field: str = "docker_image", refresh: bool = False) -> CachedImage:
        """The cached image for reference ``text``, pulled and converted if needed."""
        self._setup()
        ref = parse(text, field)
        key = str(ref)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            image = None if refresh and not ref.digest else self.lookup(ref)
            if image is None:
                async with self._pulls:
                    timeout = self.settings.image_pull_timeout_seconds
                    try:
                        image = await asyncio.wait_for(self._fetch(ref, field), timeout)
                    except TimeoutError:
                        raise Unavailable(
                            f"pulling {ref} took longer than {timeout:g} s (UNKEY_METALD_IMAGE_PULL_TIMEOUT_SECONDS)"
                        ) from None
                self.evict(keep=image.digest)
            self.touch(image)
            return image

    async def _fetch(self, ref: ImageRef, field: str) -> CachedImage:
        work = self.tmp_dir / uuid.uuid4().hex
        work.mkdir(mode=0o700)
        started = time.monotonic()
        try:
            pulled = await self.puller.pull(ref, work, field)
            image = self._load(pulled.digest)
            if image is None:
                image = await self._convert(ref, pulled.digest, pulled.layout, work, field)
                log.info(
                    "image %s converted",
                    ref,
                    extra={"digest": pulled.digest, "seconds": round(time.monotonic() - started, 2)},
                )
            self._remember(ref, image)
            return image
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)

    async def _convert(self, ref: ImageRef, digest: str, layout: Path, work: Path, field: str) -> CachedImage:
        limit = self.settings.image_max_bytes
        await asyncio.to_thread(layers.check_layers, layout, field, limit)
        _, config = layers.read_layout(layout)
        rootfs = work / "rootfs"
        await layers.unpack(layout, rootfs, field)
        convert.install_init(rootfs, await self.boot.init_binary(), config)
        out = work / "image"
        out.mkdir(mode=0o755)
        size = await convert.make_ext4(rootfs, out / ROOTFS)
        os.chmod(out / ROOTFS, 0o444)
        meta = {"digest": digest, "refs": [str(ref)], "created_at": time.time(), "size_bytes": size}
        meta["config"] = config.get("config") or {}
        (out / META).write_text(json.dumps(meta, indent=1))
        final = self.images_dir / _hex(digest)
        if final.exists() and not (final / META).is_file():  # not made by this code: never used, replaced
            shutil.rmtree(final)
        try:
            os.rename(out, final)
        except OSError:
            if not (final / META).is_file():
                raise
        image = self._load(digest)
        assert image is not None
        return image

    def _remember(self, ref: ImageRef, image: CachedImage) -> None:
        if str(ref) not in image.refs:
            meta_path = image.path.parent / META
            meta = json.loads(meta_path.read_text())
            meta["refs"] = sorted(set(meta.get("refs", [])) | {str(ref)})
            tmp = meta_path.with_name(".tmp." + META)
            tmp.write_text(json.dumps(meta, indent=1))
            os.replace(tmp, meta_path)
            image.refs = meta["refs"]
        if not ref.digest:
            path = self._ref_file(ref)
            tmp = path.with_name(".tmp." + path.name)
            tmp.write_text(json.dumps({"ref": str(ref), "digest": image.digest}))
            os.replace(tmp, path)

    # --- removal ---------------------------------------------------------------
    def _drop(self, image: CachedImage) -> None:
        for ref_file in self.refs_dir.glob("*.json"):
            with contextlib.suppress(OSError, ValueError):
                if json.loads(ref_file.read_text()).get("digest") == image.digest:
                    ref_file.unlink()
        trash = self.tmp_dir / f"evict-{uuid.uuid4().hex}"
        os.rename(image.path.parent, trash)  # gone from the cache in one step
        shutil.rmtree(trash, ignore_errors=True)

    def remove(self, text: str) -> CachedImage:
        """Remove one cached image (by reference or digest) that no VM uses."""
        self._setup()
        image = self._load(text) if text.startswith("sha256:") else self.lookup(parse(text, "image"))
        if image is None:
            raise NotFound(f"image {text} is not in the cache")
        users = self.users().get(image.digest, [])
        if users:
            raise FailedPrecondition(f"image {image.digest} is used by VMs: {', '.join(sorted(users))}")
        self._drop(image)
        return image

    def evict(self, keep: str | None = None) -> builtins.list[str]:
        """Evict least recently used images no VM uses until the cache fits its bound."""
        images = self.list()
        total = sum(i.disk_bytes for i in images)
        evicted: builtins.list[str] = []
        for image in sorted(images, key=lambda i: i.last_used):
            if total <= self.settings.image_cache_bytes:
                break
            if image.in_use_by or image.digest == keep:
                continue
            self._drop(image)
            total -= image.disk_bytes
            evicted.append(image.digest)
            log.info("image evicted from the cache", extra={"digest": image.digest})
        return evicted
