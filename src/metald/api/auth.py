"""Callers and tenancy: who is asking, and which VMs they may see.

Every request is tied to a caller identity: the client certificate's SPIFFE ID
under mTLS, or (TLS disabled, development) the ``X-Metald-Caller`` header or the
original's development tokens, ``Authorization: Bearer dev_user_<id>`` and
``Bearer dev_customer_<id>`` (``<id>`` is the caller's customer). An identity
maps to a customer through ``UNKEY_METALD_CUSTOMER_MAP`` or, by convention, a
SPIFFE ID whose path ends in ``/customer/<id>``. Identities in
``UNKEY_METALD_OPERATOR_IDS`` act on every VM. A customer sees and acts on its
own VMs only; another customer's VM is reported as not found.
"""

from __future__ import annotations

import contextvars
import re
from dataclasses import dataclass

from metald.api import validate
from metald.config import Settings
from metald.core.errors import InvalidArgument, NotFound, PermissionDenied, Unauthenticated

DEV_HEADER = b"x-metald-caller"
AUTHORIZATION = b"authorization"
TENANT_HEADER = b"x-tenant-id"
LOCAL_OPERATOR = "local-operator"
_CUSTOMER_PATH = re.compile(r"^spiffe://([^/]+)/(?:.+/)?customer/([A-Za-z0-9._:@+=-]{1,128})$")
# the original's development tokens: Bearer dev_user_<customer> (its Go client) or dev_customer_<customer>
_DEV_TOKEN = re.compile(r"^Bearer (dev_user|dev_customer)_(\S+)$")


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
            trust_domain = self.settings.spiffe_trust_domain
            if match and trust_domain and match.group(1) != trust_domain:
                raise PermissionDenied(f"identity {identity} is not in trust domain {trust_domain}")
            customer = match.group(2) if match else None
        if customer is None:
            raise PermissionDenied(f"identity {identity} is neither an operator nor mapped to a customer")
        return Caller(identity, _valid_customer(customer, identity), operator=False)

    def caller_from_headers(self, headers: list[tuple[bytes, bytes]], caller_header: bool) -> Caller:
        """The caller of a plaintext (TLS disabled) request: a development token or X-Metald-Caller.

        Without either the caller is the local operator. A header given twice, an empty one, both
        at once or a malformed token is refused (unauthenticated), never read as the operator.
        """
        callers = [v for k, v in headers if k == DEV_HEADER] if caller_header else []
        tokens = [v for k, v in headers if k == AUTHORIZATION]
        tenants = [v for k, v in headers if k == TENANT_HEADER]
        for name, values in (("X-Metald-Caller", callers), ("Authorization", tokens), ("X-Tenant-ID", tenants)):
            if len(values) > 1:
                raise Unauthenticated(f"{name} given {len(values)} times: give it once")
        if callers and tokens:
            raise Unauthenticated("give either X-Metald-Caller or Authorization, not both")
        if tokens:
            return self._dev_token(tokens[0].decode("latin-1").strip(), tenants[0] if tenants else None)
        if callers:
            identity = callers[0].decode("utf-8", "replace").strip()
            if not identity:
                raise Unauthenticated("X-Metald-Caller is empty: name the caller or leave the header out")
            return self.caller_for(identity, from_tls=False)
        return self.caller_for(None, from_tls=False)

    def _dev_token(self, token: str, tenant: bytes | None) -> Caller:
        match = _DEV_TOKEN.match(token)
        if match is None:
            raise Unauthenticated(
                "Authorization: expected 'Bearer dev_user_<customer>' or 'Bearer dev_customer_<customer>' "
                "(development tokens, TLS disabled)"
            )
        identity = f"{match.group(1)}_{match.group(2)}"
        customer = _valid_customer(match.group(2), identity)
        if tenant is not None:
            tenant_id = tenant.decode("latin-1").strip()
            try:
                validate.customer_id(tenant_id or ".")
            except InvalidArgument:
                raise Unauthenticated("X-Tenant-ID: must be 1-128 characters of letters, digits and ._:@/+=-") from None
            identity = f"{identity} tenant={tenant_id}"
        return Caller(identity, customer, operator=False)


def _valid_customer(customer: str, identity: str) -> str:
    """A customer id derived from an identity, checked like one given in CreateVm."""
    try:
        return validate.customer_id(customer)
    except InvalidArgument:
        raise Unauthenticated(f"identity {identity[:200]!r} names an invalid customer id") from None


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
