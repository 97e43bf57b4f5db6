"""QEMU microvm backend."""

from metald.backends.qemu.backend import QemuBackend

__all__ = ["QemuBackend"]
