"""Who may call what: an identity from the caller's TLS client certificate (its subject
CN, else its first subject alternative name), a role from the daemon's ``--role
PATTERN=ROLE`` mapping (shell-style patterns, first match wins), and a server
interceptor that refuses a method the role does not allow (PERMISSION_DENIED naming the
identity, its role and the role the method needs) before the handler runs, so a denied
call changes nothing. The same interceptor reports each finished call of chosen methods
(the coordinator's audit trail).

A replica that forwards a call to the leader passes the caller's identity along
(metadata ``blocktxn-on-behalf-of``); the leader takes it only from a caller whose own
role is ``coordinator``; without roles it records ``CLAIMED via CALLER``.
"""

from __future__ import annotations

import contextvars
import fnmatch
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

ROLES = ("reader", "operator", "agent", "coordinator")
ON_BEHALF = "blocktxn-on-behalf-of"

#: The identity of the call this task serves (set by the interceptor).
CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("blocktxn_caller", default="")
#: Set by a handler that passed its call on to the leader (the leader audits it).
FORWARDED: contextvars.ContextVar[bool] = contextvars.ContextVar("blocktxn_forwarded",
                                                                 default=False)


@dataclass(frozen=True)
class RoleMap:
    """``(pattern, role)`` pairs in the order given; empty: roles are not enforced."""

    entries: tuple[tuple[str, str], ...] = ()

    @property
    def enforced(self) -> bool:
        return bool(self.entries)

    def role(self, identity: str) -> str:
        for pattern, role in self.entries:
            if fnmatch.fnmatchcase(identity, pattern):
                return role
        return ""


def parse_roles(specs: Sequence[str]) -> RoleMap:
    """``--role PATTERN=ROLE`` values, e.g. ``ops-*=operator``, ``h*=agent``.

    Raises: ValueError naming the bad entry."""
    entries = []
    for spec in specs:
        pattern, sep, role = spec.rpartition("=")
        if not sep or not pattern or role not in ROLES:
            raise ValueError(f"--role {spec!r}: expected PATTERN=ROLE with ROLE one of "
                             f"{', '.join(ROLES)}")
        entries.append((pattern, role))
    return RoleMap(tuple(entries))


def identity_of(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The caller's certificate CN (else first SAN); ``peer:ADDRESS`` without one."""
    auth = context.auth_context()
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        values = list(auth.get(key) or [])
        if values:
            return bytes(values[0]).decode(errors="replace")
    return f"peer:{context.peer()}"


#: ``on_call(method, identity, role, request, code, detail)`` after a chosen method ends.
OnCall = Callable[[str, str, str, Any, grpc.StatusCode, str], Awaitable[None]]


class AccessInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self, service: str, allowed: Mapping[str, frozenset[str]], roles: RoleMap,
                 check: Callable[[str, str, Any], str] | None = None,
                 audited: frozenset[str] = frozenset(), on_call: OnCall | None = None
                 ) -> None:
        """*allowed*: method name -> roles that may call it (methods of *service*
        only; other services, health and reflection, are open). *check(method,
        identity, request)* may refuse a request (a non-empty reason) beyond its role,
        e.g. an agent registering under another agent's id."""
        self.prefix = f"/{service}/"
        self.allowed, self.roles, self.check = allowed, roles, check
        self.audited, self.on_call = audited, on_call

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        method = details.method
        if handler is None or not method.startswith(self.prefix):
            return handler
        name = method[len(self.prefix):]
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(name, handler.unary_unary),
                handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(name, handler.unary_stream),
                handler.request_deserializer, handler.response_serializer)
        return handler

    def _admit(self, name: str, request: Any, context: grpc.aio.ServicerContext[Any, Any]
               ) -> tuple[str, str, str]:
        """(identity, role, why the call is refused or "")."""
        identity = identity_of(context)
        role = self.roles.role(identity)
        behalf = dict(context.invocation_metadata() or ()).get(ON_BEHALF)
        if behalf and role == "coordinator":
            identity = str(behalf)
            role = self.roles.role(identity)
        elif behalf:  # no roles: anyone may claim it, so say who claimed it
            identity = f"{behalf} via {identity}"
        CALLER.set(identity)
        if not self.roles.enforced:
            return identity, role, ""
        needed = self.allowed.get(name, frozenset())
        if role not in needed:
            return identity, role, (f"{identity} (role {role or 'none'}) may not call "
                                    f"{name}: it needs {' or '.join(sorted(needed)) or 'no one'}")
        why = self.check(name, identity, request) if self.check and role != "coordinator" \
            else ""
        return identity, role, f"{identity}: {why}" if why else ""

    async def _report(self, name: str, identity: str, role: str, request: Any,
                      code: grpc.StatusCode, detail: str) -> None:
        if self.on_call is not None and name in self.audited and not FORWARDED.get():
            await self.on_call(name, identity, role, request, code, detail)

    def _wrap_unary(self, name: str, behavior: Any) -> Any:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            identity, role, refused = self._admit(name, request, context)
            if refused:
                await self._report(name, identity, role, request,
                                   grpc.StatusCode.PERMISSION_DENIED, refused)
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, refused)
            try:
                reply = await behavior(request, context)
            except BaseException:
                code = context.code() or grpc.StatusCode.UNKNOWN
                await self._report(name, identity, role, request, code,
                                   str(context.details() or ""))
                raise
            await self._report(name, identity, role, request, grpc.StatusCode.OK, "")
            return reply
        return wrapped

    def _wrap_stream(self, name: str, behavior: Any) -> Any:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            _, _, refused = self._admit(name, request, context)
            if refused:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, refused)
            async for item in behavior(request, context):
                yield item
        return wrapped


class OnBehalfOf(grpc.aio.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
                 grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    """On a replica's channel to the leader: pass the served caller's identity on."""

    def _details(self, details: Any) -> Any:
        caller = CALLER.get()
        if not caller:
            return details
        metadata = grpc.aio.Metadata(*(details.metadata or ()), (ON_BEHALF, caller))
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata,
                                          details.credentials, details.wait_for_ready)

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any
                                    ) -> Any:
        return await continuation(self._details(details), request)

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any
                                     ) -> Any:
        return await continuation(self._details(details), request)
