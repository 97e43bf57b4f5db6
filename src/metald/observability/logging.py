"""Structured JSON logs. Every line carries the VM id and operation in scope."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

from metald.core.logs import log_context, operation_var, vm_id_var

trace_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("trace_id", default="")

_RESERVED = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}

__all__ = ["JsonFormatter", "log_context", "operation_var", "trace_id_var", "vm_id_var"]


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "vm_id": getattr(record, "vm_id", "") or vm_id_var.get(),
            "operation": getattr(record, "operation", "") or operation_var.get(),
        }
        trace = trace_id_var.get()
        if trace:
            entry["trace_id"] = trace
        for key, value in vars(record).items():
            if key not in _RESERVED and key not in entry and not key.startswith("_"):
                entry[key] = value if isinstance(value, str | int | float | bool) else str(value)
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("hypercorn.access", "asyncio", "qemu.qmp", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
