"""Domain errors. The API layer maps each to one RPC code in one place."""

from __future__ import annotations

from typing import ClassVar


class MetaldError(Exception):
    """Base for every error metald reports to a caller."""

    # The RPC code name it becomes (as api/errors.py maps it), recorded in failure events.
    code: ClassVar[str] = "internal"


class InvalidArgument(MetaldError):
    code: ClassVar[str] = "invalid_argument"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFound(MetaldError):
    code: ClassVar[str] = "not_found"


class AlreadyExists(MetaldError):
    code: ClassVar[str] = "already_exists"


class FailedPrecondition(MetaldError):
    code: ClassVar[str] = "failed_precondition"


class ResourceExhausted(MetaldError):
    code: ClassVar[str] = "resource_exhausted"


class PermissionDenied(MetaldError):
    code: ClassVar[str] = "permission_denied"


class Unauthenticated(MetaldError):
    code: ClassVar[str] = "unauthenticated"


class Unavailable(MetaldError):
    code: ClassVar[str] = "unavailable"


class Unimplemented(MetaldError):
    """The backend in use does not offer this (e.g. snapshots on Firecracker)."""


class BackendError(MetaldError):
    """The VMM or a host facility refused or failed an operation."""

    code: ClassVar[str] = "unavailable"


class StepFailed(MetaldError):
    """A plan step failed; the plan's finished steps were undone."""

    def __init__(self, plan: str, step: str, cause: BaseException) -> None:
        super().__init__(f"{plan}: step {step!r} failed: {cause}")
        self.plan = plan
        self.step = step
        self.cause = cause
