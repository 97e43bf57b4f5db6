"""Domain errors. The API layer maps each to one RPC code in one place."""

from __future__ import annotations


class MetaldError(Exception):
    """Base for every error metald reports to a caller."""


class InvalidArgument(MetaldError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFound(MetaldError):
    pass


class AlreadyExists(MetaldError):
    pass


class FailedPrecondition(MetaldError):
    pass


class ResourceExhausted(MetaldError):
    pass


class PermissionDenied(MetaldError):
    pass


class Unauthenticated(MetaldError):
    pass


class Unavailable(MetaldError):
    pass


class Unimplemented(MetaldError):
    """The backend in use does not offer this (e.g. snapshots on Firecracker)."""


class BackendError(MetaldError):
    """The VMM or a host facility refused or failed an operation."""


class StepFailed(MetaldError):
    """A plan step failed; the plan's finished steps were undone."""

    def __init__(self, plan: str, step: str, cause: BaseException) -> None:
        super().__init__(f"{plan}: step {step!r} failed: {cause}")
        self.plan = plan
        self.step = step
        self.cause = cause
