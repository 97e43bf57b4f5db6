"""Image references, normalised the way Docker does (``nginx`` is
``docker.io/library/nginx:latest``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from metald.core.errors import InvalidArgument

DEFAULT_REGISTRY = "docker.io"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_HOST_RE = re.compile(r"^(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9a-fA-F:]+\])(?::[0-9]{1,5})?$")
MAX_REF = 512


@dataclass(frozen=True)
class ImageRef:
    registry: str
    repository: str
    tag: str | None
    digest: str | None

    def __str__(self) -> str:
        out = f"{self.registry}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out

    @property
    def transport(self) -> str:
        """skopeo's name for it; registry-1.docker.io is what docker.io means."""
        return f"docker://{self}"

    def with_digest(self, digest: str) -> ImageRef:
        return ImageRef(self.registry, self.repository, None, digest)


def parse(value: str, field: str = "docker_image") -> ImageRef:
    """Parse and normalise ``value``; raises InvalidArgument naming ``field``."""
    text = value.strip()
    if not text or len(text) > MAX_REF or any(c.isspace() or ord(c) < 0x20 for c in text):
        raise InvalidArgument(field, f"{value!r} is not an image reference")
    if "://" in text:
        raise InvalidArgument(field, "give a reference like registry/repo:tag, without a scheme")
    name, _, digest = text.partition("@")
    if digest and not _DIGEST_RE.match(digest):
        raise InvalidArgument(field, f"digest {digest!r} must be sha256: and 64 lowercase hex digits")
    tag: str | None = None
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
        if not _TAG_RE.match(tag):
            raise InvalidArgument(field, f"tag {tag!r} is not a valid tag")
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        registry, repository = first, rest
        if not _HOST_RE.match(registry):
            raise InvalidArgument(field, f"registry {registry!r} is not a host[:port]")
    else:
        registry, repository = DEFAULT_REGISTRY, name
    if registry in ("index.docker.io", "registry-1.docker.io"):
        registry = DEFAULT_REGISTRY
    if registry == DEFAULT_REGISTRY and "/" not in repository:
        repository = f"library/{repository}"
    if not _REPO_RE.match(repository):
        raise InvalidArgument(field, f"repository {repository!r} must be lowercase path components")
    if tag is None and not digest:
        tag = "latest"
    return ImageRef(registry, repository, tag, digest or None)
