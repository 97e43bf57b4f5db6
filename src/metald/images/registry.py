"""Pulling with skopeo: registry auth, TLS, multi-arch selection and blob
digests are skopeo's (containers/image); metald adds the size limit and turns
its failures into metald errors."""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metald.config import Settings
from metald.core.errors import InvalidArgument, MetaldError, NotFound, PermissionDenied, Unavailable
from metald.images.reference import ImageRef
from metald.images.tools import ToolFailed, need, run, run_bytes

INDEX_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}
OS, ARCH = "linux", "amd64"

_NOT_FOUND = ("manifest unknown", "name unknown", "not found")
_DENIED = ("unauthorized", "authentication required", "denied")
# an HTTP status in skopeo's text, never part of a port or an address ("127.0.0.1:40331")
_STATUS = re.compile(r"(?<![\d.:])(40[134])(?!\d)")
_DIGEST = ("digest did not match", "digest mismatch", "does not match digest")
_UNREACHABLE = (
    "connection refused",
    "no such host",
    "i/o timeout",
    "network is unreachable",
    "no route to host",
    "x509",
    "certificate",
    "tls:",
    "server gave http response",
    "eof",
    "connection reset",
)


@dataclass(frozen=True)
class Pulled:
    digest: str  # the manifest's digest (linux/amd64 for an index)
    layout: Path  # an OCI layout holding it under the tag "image"
    compressed_bytes: int


def _options(ref: ImageRef, settings: Settings, certs: Path | None) -> list[str]:
    opts = []
    if ref.registry in settings.insecure_registry_list:
        opts.append("--src-tls-verify=false")
    if settings.registry_auth_file is not None:
        opts += ["--src-authfile", str(settings.registry_auth_file)]
    if certs is not None:
        opts += ["--src-cert-dir", str(certs)]
    return [o for o in opts if o]


def _inspect_options(ref: ImageRef, settings: Settings, certs: Path | None) -> list[str]:
    # `skopeo inspect` names the same options without the --src- prefix
    return [o.replace("--src-", "--", 1) for o in _options(ref, settings, certs)]


def translate(exc: ToolFailed, ref: ImageRef, field: str) -> MetaldError:
    """A skopeo failure as the metald error a caller should see."""
    text = exc.stderr.lower()
    msg = exc.stderr.strip().splitlines()[-1] if exc.stderr.strip() else str(exc)
    msg = re.sub(r'^time="[^"]*" level=\w+ msg="(.*)"$', r"\1", msg)[:500]
    statuses = set(_STATUS.findall(text))
    if any(s in text for s in _DIGEST):
        return InvalidArgument(field, f"image {ref}: a blob does not match its digest: {msg}")
    if any(s in text for s in _NOT_FOUND) or "404" in statuses:
        return NotFound(f"image {ref} not found: {msg}")
    if any(s in text for s in _DENIED) or statuses & {"401", "403"}:
        return PermissionDenied(f"registry {ref.registry} refused access to {ref}: {msg}")
    if any(s in text for s in _UNREACHABLE):
        return Unavailable(f"registry {ref.registry} cannot be reached: {msg}")
    return Unavailable(f"pulling {ref} failed: {msg}")


class Puller:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def _inspect_raw(self, ref: ImageRef, certs: Path | None, field: str) -> tuple[str, dict[str, Any]]:
        """The manifest (or index) ``ref`` names and the sha256 of its bytes; a
        reference by digest must match them."""
        argv = [need("skopeo", "skopeo"), "inspect", "--raw", "--retry-times", "1"]
        argv += _inspect_options(ref, self.settings, certs) + [ref.transport]
        try:
            raw = await run_bytes(argv)
        except ToolFailed as exc:
            raise translate(exc, ref, field) from None
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        if ref.digest and digest != ref.digest:
            raise InvalidArgument(field, f"image {ref}: the registry sent a manifest whose digest is {digest}")
        try:
            data: dict[str, Any] = json.loads(raw)
        except json.JSONDecodeError:
            raise InvalidArgument(field, f"image {ref}: the registry sent a manifest that is not JSON") from None
        return digest, data

    async def manifest(self, ref: ImageRef, certs: Path | None, field: str) -> tuple[str, dict[str, Any]]:
        """The linux/amd64 manifest of ``ref``: (digest, manifest)."""
        digest, data = await self._inspect_raw(ref, certs, field)
        if data.get("mediaType") in INDEX_TYPES or "manifests" in data:
            for entry in data.get("manifests", []):
                platform = entry.get("platform", {})
                if platform.get("os") == OS and platform.get("architecture") == ARCH:
                    return await self._inspect_raw(ref.with_digest(str(entry["digest"])), certs, field)
            raise InvalidArgument(field, f"image {ref} has no {OS}/{ARCH} variant")
        if int(data.get("schemaVersion", 0)) != 2 or "layers" not in data:
            raise InvalidArgument(field, f"image {ref}: only schema 2 / OCI image manifests are supported")
        return digest, data

    async def pull(self, ref: ImageRef, workdir: Path, field: str) -> Pulled:
        """Copy ``ref`` into an OCI layout under ``workdir``, refusing images over the limit."""
        limit = self.settings.image_max_bytes
        with tempfile.TemporaryDirectory(prefix="certs.", dir=workdir) as tmp:
            certs: Path | None = None
            if self.settings.registry_ca_file is not None:
                certs = Path(tmp)
                (certs / "ca.crt").write_bytes(self.settings.registry_ca_file.read_bytes())
            digest, manifest = await self.manifest(ref, certs, field)
            layers = manifest.get("layers", [])
            total = sum(int(layer.get("size", 0)) for layer in layers)
            total += int(manifest.get("config", {}).get("size", 0))
            if total > limit:
                raise InvalidArgument(
                    field,
                    f"image {ref} is {total} bytes compressed, over the limit of {limit}"
                    " (UNKEY_METALD_IMAGE_MAX_BYTES)",
                )
            source = ref.with_digest(digest)
            layout = workdir / "oci"
            argv = [need("skopeo", "skopeo"), "--insecure-policy", "copy", "--quiet"]
            argv += ["--override-os", OS, "--override-arch", ARCH, "--retry-times", "1"]
            argv += _options(ref, self.settings, certs)
            argv += [source.transport, f"oci:{layout}:image"]
            try:
                await run(argv)
            except ToolFailed as exc:
                raise translate(exc, ref, field) from None
        return Pulled(digest=digest, layout=layout, compressed_bytes=total)
