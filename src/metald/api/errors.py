"""The one place where domain errors become RPC codes."""

from __future__ import annotations

import logging

from connectrpc.code import Code
from connectrpc.errors import ConnectError

from metald.core import errors as e

log = logging.getLogger(__name__)

_CODES: list[tuple[type[Exception], Code]] = [
    (e.InvalidArgument, Code.INVALID_ARGUMENT),
    (e.NotFound, Code.NOT_FOUND),
    (e.AlreadyExists, Code.ALREADY_EXISTS),
    (e.FailedPrecondition, Code.FAILED_PRECONDITION),
    (e.ResourceExhausted, Code.RESOURCE_EXHAUSTED),
    (e.PermissionDenied, Code.PERMISSION_DENIED),
    (e.Unauthenticated, Code.UNAUTHENTICATED),
    (e.Unavailable, Code.UNAVAILABLE),
    (e.Unimplemented, Code.UNIMPLEMENTED),
    (e.BackendError, Code.UNAVAILABLE),
]


def to_connect(exc: BaseException) -> ConnectError:
    if isinstance(exc, ConnectError):
        return exc
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return ConnectError(code, str(exc))
    log.exception("internal error", exc_info=exc)
    return ConnectError(Code.INTERNAL, f"internal error: {type(exc).__name__}")
