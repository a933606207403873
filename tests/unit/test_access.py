"""Who a call is recorded as, and the bound on denied-call audit records."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from blocktxn.access import ON_BEHALF, AccessInterceptor, RoleMap, parse_roles
from blocktxn.coordinator import audit
from blocktxn.coordinator.audit import DENIED_PER_MINUTE, Auditor


class Context:
    """The parts of a grpc.aio servicer context the interceptor reads."""

    def __init__(self, cn: str | None, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.cn, self.metadata = cn, metadata

    def auth_context(self) -> dict[str, list[bytes]]:
        return {"x509_common_name": [self.cn.encode()]} if self.cn else {}

    def peer(self) -> str:
        return "ipv4:127.0.0.1:5555"

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata


def admit(roles: RoleMap, ctx: Any, method: str = "StartTransaction",
          request: Any = None) -> tuple[str, str, str]:
    interceptor = AccessInterceptor(audit.SERVICE, audit.allowed(), roles, audit._own_id)
    return interceptor._admit(method, request, ctx)


ROLES = parse_roles(["coord*=coordinator", "ops=operator", "alice=reader", "h*=agent"])


def test_a_claimed_identity_counts_only_from_a_coordinator() -> None:
    forwarded = ((ON_BEHALF, "ops"),)
    assert admit(ROLES, Context("coord2", forwarded)) == ("ops", "operator", "")
    who, role, refused = admit(ROLES, Context("alice", ((ON_BEHALF, "ops"),)))
    assert (who, role) == ("ops via alice", "reader")      # the claim is not taken, but
    assert "may not call StartTransaction" in refused     # recorded with who made it
    # without roles anyone may claim anything: the record says who claimed it
    assert admit(RoleMap(), Context(None, forwarded))[0] == "ops via peer:ipv4:127.0.0.1:5555"
    assert admit(RoleMap(), Context("x", forwarded))[0] == "ops via x"


def test_an_agent_registers_only_as_itself() -> None:
    class Req:
        agent_id = "h1"

    assert admit(ROLES, Context("h1"), "RegisterAgent", Req())[2] == ""
    assert admit(ROLES, Context("h2"), "RegisterAgent", Req())[2] == (
        "h2: may register only as agent 'h2', not 'h1'")
    assert "may not call StartTransaction" in admit(ROLES, Context("h1"))[2]


@pytest.mark.parametrize("spec", ["ops=admin", "=reader", "ops"])
def test_bad_role_entries(spec: str) -> None:
    with pytest.raises(ValueError, match="--role"):
        parse_roles([spec])


def test_denied_calls_are_recorded_a_bounded_number_of_times(monkeypatch: Any) -> None:
    written: list[Any] = []

    class Store:
        async def put_audit(self, record: Any) -> None:
            written.append(record)

    import asyncio

    auditor = Auditor(Store())  # type: ignore[arg-type]

    async def calls() -> None:
        for who in ("mallory", "eve"):
            for _ in range(DENIED_PER_MINUTE + 5):
                await auditor.record("ListAgents", who, "", grpc_request(),
                                     grpc.StatusCode.PERMISSION_DENIED, "no")
        await auditor.record("StartTransaction", "ops", "operator", grpc_request(),
                             grpc.StatusCode.OK, "")

    minute = [600.0]
    monkeypatch.setattr("time.time", lambda: minute[0])
    asyncio.run(calls())
    assert len(written) == 2 * DENIED_PER_MINUTE + 1
    minute[0] += 60  # a new minute: recorded again
    asyncio.run(calls())
    assert len(written) == 2 * (2 * DENIED_PER_MINUTE + 1)


def grpc_request() -> Any:
    from blocktxn.v1 import coordinator_pb2 as cpb

    return cpb.ListAgentsRequest()
