"""Checking layers before they are applied, and applying them with umoci.

umoci applies layers in order with OCI whiteouts (``.wh.`` files and opaque
directories), owners, modes, hard links and symlinks, and never writes outside
the target: it resolves every path inside the root (as if chrooted). It
silently confines an entry named ``../x`` or ``/x`` instead of refusing it, so
metald reads every layer first and refuses, with the reason, an image that
tries to leave its root: an entry path or hard-link target climbing above the
root or absolute, or an entry written through a symlink whose relative target
climbs above the root. (An absolute symlink target is fine: like Docker,
it is resolved inside the image.) The same pass counts the unpacked size.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from pathlib import Path
from typing import Any

from metald.core.errors import InvalidArgument
from metald.images.tools import ToolFailed, need, run

LAYER_TYPES_OK = ("tar", "tar+gzip", "tar+bzip2", "tar+xz", "diff.tar.gzip", "diff.tar")


def _blob(layout: Path, digest: str) -> Path:
    algo, _, hexd = digest.partition(":")
    return layout / "blobs" / algo / hexd


def read_layout(layout: Path, tag: str = "image") -> tuple[dict[str, Any], dict[str, Any]]:
    """(manifest, image config) of ``tag`` in an OCI layout."""
    index = json.loads((layout / "index.json").read_text())
    for entry in index.get("manifests", []):
        if entry.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            manifest = json.loads(_blob(layout, entry["digest"]).read_bytes())
            config = json.loads(_blob(layout, manifest["config"]["digest"]).read_bytes())
            return manifest, config
    raise FileNotFoundError(f"no {tag} in {layout}")


def _normal(path: str) -> list[str] | None:
    """Path components inside the root, or None if the path climbs out of it."""
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                return None
            parts.pop()
        else:
            parts.append(part)
    return parts


class Scan:
    """The checks over all layers of one image, in order."""

    def __init__(self, field: str, max_bytes: int) -> None:
        self.field = field
        self.max_bytes = max_bytes
        self.bytes = 0
        self.entries = 0
        self.symlinks: dict[str, str] = {}  # path -> target, for the relative targets that leave the root

    def _refuse(self, layer: int, name: str, why: str) -> InvalidArgument:
        return InvalidArgument(self.field, f"layer {layer}: entry {name!r} {why}; the image is refused")

    def member(self, layer: int, m: tarfile.TarInfo) -> None:
        name = m.name
        if name.startswith("/"):
            raise self._refuse(layer, name, "has an absolute path")
        parts = _normal(name)
        if parts is None:
            raise self._refuse(layer, name, "escapes the root (..)")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix in self.symlinks:
                target = self.symlinks[prefix]
                why = f"is written through symlink {prefix} -> {target}, which leaves the root"
                raise self._refuse(layer, name, why)
        path = "/".join(parts)
        self.symlinks.pop(path, None)
        if m.islnk():
            if m.linkname.startswith("/") or _normal(m.linkname) is None:
                raise self._refuse(layer, name, f"is a hard link to {m.linkname!r} outside the root")
        elif m.issym() and not m.linkname.startswith("/"):
            target = posixpath.join(posixpath.dirname(path), m.linkname)
            if _normal(target) is None:
                self.symlinks[path] = m.linkname
        self.entries += 1
        self.bytes += max(m.size, 0) + 512
        if self.bytes > self.max_bytes:
            raise InvalidArgument(
                self.field,
                f"the image unpacks to more than {self.max_bytes} bytes (UNKEY_METALD_IMAGE_MAX_BYTES); refused",
            )

    def layer(self, index: int, path: Path) -> None:
        try:
            with tarfile.open(path, mode="r|*") as tar:
                for member in tar:
                    self.member(index, member)
        except tarfile.TarError as exc:
            raise InvalidArgument(self.field, f"layer {index} is not a readable tar archive: {exc}") from None


def check_layers(layout: Path, field: str, max_bytes: int) -> Scan:
    """Refuse an image whose layers would leave the root or exceed the size limit."""
    manifest, _ = read_layout(layout)
    scan = Scan(field, max_bytes)
    for i, layer in enumerate(manifest.get("layers", [])):
        media = str(layer.get("mediaType", ""))
        if "zstd" in media:
            raise InvalidArgument(field, f"layer {i} is zstd-compressed, which is not supported")
        scan.layer(i, _blob(layout, layer["digest"]))
    return scan


async def unpack(layout: Path, rootfs: Path, field: str) -> None:
    """Apply the layers into ``rootfs`` (which must not exist) with umoci."""
    argv = [need("umoci", "umoci"), "raw", "unpack", "--image", f"{layout}:image", str(rootfs)]
    try:
        await run(argv)
    except ToolFailed as exc:
        raise InvalidArgument(field, f"the image's layers cannot be applied: {exc.stderr.strip()[-400:]}") from None
