"""What metald-init runs: the image's own settings (written into the image as
/.metald/config) and a VM's overrides from its metadata (passed on the kernel
command line as ``metald.overrides=<base64>``).

Format, one entry per line: ``<key>\\t<value>``, the value escaped (``\\\\``,
``\\n``, ``\\t``). Keys: ``entrypoint`` and ``cmd`` (one line per word),
``entrypoint-reset`` / ``cmd-reset`` (empty them), ``env`` (NAME=value),
``workdir``, ``user``.

Metadata keys (docs/images.md): ``env.NAME`` = value; ``entrypoint`` and
``cmd`` = a JSON array of strings or shell words; ``workdir``; ``user``
(name, uid, name:group or uid:gid). As with ``docker run --entrypoint``, a new
entrypoint drops the image's CMD unless ``cmd`` is given too.
"""

from __future__ import annotations

import base64
import json
import re
import shlex
from typing import Any

from metald.core.errors import InvalidArgument

OVERRIDE_KEYS = ("entrypoint", "cmd", "workdir", "user")
ENV_PREFIX = "env."
KERNEL_ARG = "metald.overrides"
# The x86 kernel command line is at most 2048 bytes; metald's own arguments and
# ip= take about 250 of them.
MAX_OVERRIDES_ARG = 1500
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")


def _lines(entries: list[tuple[str, str]]) -> str:
    return "".join(f"{key}\t{_escape(value)}\n" for key, value in entries)


def image_config(config: dict[str, Any]) -> str:
    """/.metald/config from an OCI image config."""
    c = config.get("config") or {}
    entries: list[tuple[str, str]] = []
    entries += [("entrypoint", str(w)) for w in c.get("Entrypoint") or []]
    entries += [("cmd", str(w)) for w in c.get("Cmd") or []]
    entries += [("env", str(e)) for e in c.get("Env") or []]
    if c.get("WorkingDir"):
        entries.append(("workdir", str(c["WorkingDir"])))
    if c.get("User"):
        entries.append(("user", str(c["User"])))
    return _lines(entries)


def _words(key: str, value: str, field: str) -> list[str]:
    text = value.strip()
    if text.startswith("["):
        try:
            words = json.loads(text)
        except json.JSONDecodeError:
            raise InvalidArgument(f"{field}.{key}", "is not a JSON array of strings") from None
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise InvalidArgument(f"{field}.{key}", "must be a JSON array of strings")
        return words
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise InvalidArgument(f"{field}.{key}", f"cannot be split into words: {exc}") from None


def overrides(metadata: dict[str, str], field: str = "config.metadata") -> list[tuple[str, str]]:
    """The overrides a VM's metadata asks for (validated)."""
    entries: list[tuple[str, str]] = []
    if "entrypoint" in metadata:
        entries.append(("entrypoint-reset", ""))
        entries += [("entrypoint", w) for w in _words("entrypoint", metadata["entrypoint"], field)]
        if "cmd" not in metadata:
            entries.append(("cmd-reset", ""))
    if "cmd" in metadata:
        entries.append(("cmd-reset", ""))
        entries += [("cmd", w) for w in _words("cmd", metadata["cmd"], field)]
    for key in ("workdir", "user"):
        if key in metadata:
            value = metadata[key]
            if "\n" in value:
                raise InvalidArgument(f"{field}.{key}", "must be one line")
            entries.append((key, value))
    for key, value in sorted(metadata.items()):
        if key.startswith(ENV_PREFIX):
            name = key[len(ENV_PREFIX) :]
            if not _ENV_NAME.match(name):
                raise InvalidArgument(f"{field}.{key}", "the variable name must be letters, digits and _")
            entries.append(("env", f"{name}={value}"))
    return entries


def kernel_arg(metadata: dict[str, str], field: str = "config.metadata") -> str | None:
    """``metald.overrides=...`` for the kernel command line, or None without overrides."""
    entries = overrides(metadata, field)
    if not entries:
        return None
    encoded = base64.urlsafe_b64encode(_lines(entries).encode()).decode().rstrip("=")
    if len(encoded) > MAX_OVERRIDES_ARG:
        raise InvalidArgument(
            field,
            "the image overrides (env.*, cmd, entrypoint, workdir, user) are too long for the kernel"
            f" command line ({len(encoded)} > {MAX_OVERRIDES_ARG} encoded bytes)",
        )
    return f"{KERNEL_ARG}={encoded}"
