"""The freeze watchdog of a libvirt domain (``python -m blocktxn.agent.libvirt.watchdog``):
the same line protocol
as the bare-QEMU one (``agent/watchdog.py``), ending the
quiesce through libvirt: ``--freeze`` thaws the guest's filesystems (libvirt owns the
guest-agent channel), ``--pause`` resumes the domain. It opens its own libvirt
connection at its start (before it says ready) and opens a new one at the deadline if
that one died meanwhile (libvirtd restarted)."""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

import libvirt

from ..errors import QemuError
from ..watchdog import END_TIMEOUT, serve

CALL_TIMEOUT = END_TIMEOUT


class _Domain:
    """One domain over a connection of the watchdog's own."""

    def __init__(self, uri: str, name: str) -> None:
        self.uri = uri
        self.name = name
        self._dom: Any = None

    def _open(self) -> Any:
        if self._dom is None or not self._dom.connect().isAlive():
            self._dom = libvirt.open(self.uri).lookupByName(self.name)
        return self._dom

    def _thaw(self) -> None:
        self._open().fsThaw(None, 0)

    def _resume(self) -> None:
        dom = self._open()
        if dom.state(0)[0] == libvirt.VIR_DOMAIN_PAUSED:
            dom.resume()

    async def run(self, fn: Any) -> None:
        try:
            await asyncio.wait_for(asyncio.to_thread(fn), CALL_TIMEOUT)
        except libvirt.libvirtError as err:
            self._dom = None
            raise QemuError(f"libvirt domain {self.name}: {err}") from err

    async def thaw(self) -> None:
        await self.run(self._thaw)

    async def resume(self) -> None:
        await self.run(self._resume)


async def watch(uri: str, domain: str, how: str) -> None:
    dom = _Domain(uri, domain)
    await dom.run(dom._open)
    await serve(f"libvirt domain {domain}", dom.thaw if how == "freeze" else dom.resume,
                claim_key(uri, domain))


def claim_key(uri: str, domain: str) -> str:
    """The key of a libvirt domain's claim (see ``VmClaim``)."""
    return f"libvirt {uri} {domain}"


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m blocktxn.agent.libvirt.watchdog")
    p.add_argument("--uri", required=True, help="libvirt URI")
    p.add_argument("--domain", required=True, help="libvirt domain name")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--freeze", action="store_const", const="freeze", dest="how",
                     help="thaw the guest's filesystems at the deadline")
    how.add_argument("--pause", action="store_const", const="pause", dest="how",
                     help="resume the paused domain at the deadline")
    args = p.parse_args()
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # raised, not printed
    logging.basicConfig(level=logging.INFO, format="%(asctime)s watchdog %(message)s")
    asyncio.run(watch(args.uri, args.domain, args.how))


if __name__ == "__main__":
    main()
