"""Errors of the jailer that are not VM-request errors."""

from __future__ import annotations

from metald.config import ConfigError


class JailerConfigError(ConfigError):
    """A jailer setting (or the host) cannot work; the message names the variable."""
