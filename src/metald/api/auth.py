"""Callers and tenancy: who is asking, and which VMs they may see.

Every request is tied to a caller identity: the client certificate's SPIFFE ID
under mTLS, or (TLS disabled, development) the ``X-Metald-Caller`` header. An
identity maps to a customer through ``UNKEY_METALD_CUSTOMER_MAP`` or, by
convention, a SPIFFE ID whose path ends in ``/customer/<id>``. Identities in
``UNKEY_METALD_OPERATOR_IDS`` act on every VM. A customer sees and acts on its
own VMs only; another customer's VM is reported as not found.
"""

from __future__ import annotations

import contextvars
import re
from dataclasses import dataclass

from metald.config import Settings
from metald.core.errors import NotFound, PermissionDenied, Unauthenticated

DEV_HEADER = b"x-metald-caller"
LOCAL_OPERATOR = "local-operator"
_CUSTOMER_PATH = re.compile(r"^spiffe://[^/]+/(?:.+/)?customer/([A-Za-z0-9._:@+=-]{1,128})$")


@dataclass(frozen=True)
class Caller:
    identity: str
    customer_id: str | None  # None: not tied to a customer
    operator: bool

    def may_see(self, customer_id: str) -> bool:
        return self.operator or (self.customer_id is not None and customer_id == self.customer_id)


caller_var: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("caller", default=None)


class Authorizer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.operators = {i.strip() for i in settings.operator_ids.split(",") if i.strip()}
        self.customers: dict[str, str] = {}
        for pair in settings.customer_map.split(","):
            identity, sep, customer = pair.strip().partition("=")
            if sep and identity and customer:
                self.customers[identity] = customer

    def caller_for(self, identity: str | None, from_tls: bool) -> Caller:
        """The caller for an authenticated identity (or None: no identity presented)."""
        if identity is None:
            if from_tls:
                raise Unauthenticated("a client certificate with a SPIFFE ID is required")
            return Caller(LOCAL_OPERATOR, None, operator=True)
        if len(identity) > 2048:
            raise Unauthenticated("caller identity too long")
        if identity in self.operators:
            return Caller(identity, None, operator=True)
        customer = self.customers.get(identity)
        if customer is None:
            match = _CUSTOMER_PATH.match(identity)
            customer = match.group(1) if match else None
        if customer is None:
            raise PermissionDenied(f"identity {identity} is neither an operator nor mapped to a customer")
        return Caller(identity, customer, operator=False)


def current() -> Caller:
    caller = caller_var.get()
    if caller is None:  # only reachable if the app was mounted without the auth layer
        raise Unauthenticated("no caller identity")
    return caller


def customer_for_create(requested: str) -> str:
    """The customer a new VM belongs to; a customer may only create its own."""
    caller = current()
    if caller.operator:
        return requested
    if requested and requested != caller.customer_id:
        raise PermissionDenied(f"customer_id {requested!r} is not the caller's customer")
    return caller.customer_id or ""


def check_visible(vm_id: str, owner: str | None) -> None:
    """Raise NotFound (not PermissionDenied: existence is not revealed)."""
    if owner is None or not current().may_see(owner):
        raise NotFound(f"vm {vm_id} not found")


def list_scope() -> str | None:
    """The customer to filter ListVms by, or None for every VM."""
    caller = current()
    return None if caller.operator else (caller.customer_id or "")
