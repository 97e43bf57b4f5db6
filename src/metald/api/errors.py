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
    if isinstance(exc, e.BackendError) or not isinstance(exc, e.MetaldError):
        # a step's failure (wrapped as BackendError by the runner) may come from storage
        from metald.store.storage import translate

        storage = translate(exc)  # full, read-only or failing storage: unavailable, and say so
        if storage is not None:
            log.warning("%s", storage)
            return ConnectError(Code.UNAVAILABLE, str(storage))
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return ConnectError(code, str(exc))
    log.exception("internal error", exc_info=exc)
    return ConnectError(Code.INTERNAL, f"internal error: {type(exc).__name__}")
