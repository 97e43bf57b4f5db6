"""The VM id and operation in scope, for every log line (read by the log formatter)."""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

vm_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("vm_id", default="")
operation_var: contextvars.ContextVar[str] = contextvars.ContextVar("operation", default="")


@contextmanager
def log_context(vm_id: str = "", operation: str = "") -> Iterator[None]:
    tokens = []
    if vm_id:
        tokens.append((vm_id_var, vm_id_var.set(vm_id)))
    if operation:
        tokens.append((operation_var, operation_var.set(operation)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)
