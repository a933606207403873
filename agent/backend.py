"""The hypervisor seam: everything the agent asks of one VM, behind one interface.

The agent's runner, planner and steps speak only this interface; a backend maps it
onto its hypervisor. The first backend is bare QEMU over QMP plus qemu-ga
(``blocktxn.agent.qemu``). The contract follows the checkpoint scheme of DESIGN.md:

- a *checkpoint* is a persistent dirty bitmap named by the agent; a cut adds the new
  one and starts every member's copy in ONE atomic step (``start_jobs``); an
  incremental copies what the previous checkpoint recorded and never clears it;
- the barrier is ``wait_copied`` (every member's data is copied; for QEMU the job is
  ``pending``, for a push-mode hypervisor job it may simply be "completed") followed
  by ``close_targets`` (the hypervisor has written and let go of every target image;
  the runner then fsyncs the files);
- commit drops the previous checkpoint, abort cancels the jobs (``rollback_jobs``)
  and drops the new one (both through ``drop_checkpoints``);
- quiesce is ``freeze_prepare`` (before the freeze window: start whatever must thaw the
  guest at its deadline even if the agent dies), ``freeze`` and ``thaw``.

Every method that talks to the hypervisor has a deadline and raises only the agent's
errors (``QemuError``, ``VmLostError``, ``AgentTimeoutError``).
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .participant_messages import MemberPlan

#: Every name this agent creates in a VM starts with one of these (jobs and nodes;
#: checkpoints); it never touches anything else there.
NODE_PREFIX = "btx"
CHECKPOINT_PREFIX = "blocktxn:"


@dataclass(frozen=True)
class Checkpoint:
    """One dirty bitmap of a disk."""

    name: str
    recording: bool
    persistent: bool
    inconsistent: bool
    busy: bool = False
    count: int = 0
    granularity: int = 0


@dataclass(frozen=True)
class Disk:
    """One disk of a VM, with its checkpoints (named ones only)."""

    name: str
    size: int
    format: str
    checkpoints: tuple[Checkpoint, ...] = field(default=())
    allocated: int = 0  # bytes the image holds (what a full backup copies at most)

    def checkpoint(self, name: str) -> Checkpoint | None:
        return next((c for c in self.checkpoints if c.name == name), None)


@dataclass
class JobProgress:
    """A backup job of this agent's, as the hypervisor last reported it."""

    id: str
    status: str  # QMP job status words: running, pending, concluded, ...
    done: int = 0
    total: int = 0
    error: str = ""


#: Called with the backend when its VM connection is lost or (re)established.
OnChange = Callable[["VmBackend"], Awaitable[None]]


class VmBackend(abc.ABC):
    """One VM as the agent sees it: disks, checkpoints, backup jobs, quiesce."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.on_lost: OnChange | None = None
        self.on_connected: OnChange | None = None

    # ------------------------------------------------------------ lifecycle
    @property
    @abc.abstractmethod
    def connected(self) -> bool:
        """The VM is reachable now."""

    @abc.abstractmethod
    def start(self) -> None:
        """Begin (re)connecting in the background."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Disconnect; stop every helper process this backend started."""

    @abc.abstractmethod
    async def wait_connected(self, timeout: float) -> bool:
        """Wait up to *timeout* seconds for the connection; return whether it is up."""

    # ------------------------------------------------------------ inventory
    @abc.abstractmethod
    async def disks(self) -> dict[str, Disk]:
        """The VM's disks (never the agent's own target nodes)."""

    @abc.abstractmethod
    def job_ids(self) -> set[str]:
        """Ids of this agent's jobs the VM holds, as last seen (no round trip)."""

    @abc.abstractmethod
    async def progress(self) -> Mapping[str, JobProgress]:
        """Current state of this agent's jobs (one round trip)."""

    @property
    @abc.abstractmethod
    def can_freeze(self) -> bool:
        """A guest agent is configured: quiesce ``freeze`` is possible."""

    @abc.abstractmethod
    async def pause_problem(self) -> str:
        """Why quiesce ``pause`` is impossible on this VM; "" if it is possible (the
        VM can pause, and something outside the agent can resume it at a deadline)."""

    # ------------------------------------------------------------------ cut
    @abc.abstractmethod
    async def freeze_prepare(self, quiesce: str) -> None:
        """Before a freeze or pause: make sure the guest will be thawed at its deadline even if
        this agent stops or dies (QEMU: start the watchdog process)."""

    @abc.abstractmethod
    async def freeze_ready(self) -> None:
        """Before the freeze window: wait until what ``freeze_prepare`` started can act
        (its start-up must not count against the freeze timeout)."""

    @abc.abstractmethod
    async def freeze_abandon(self) -> None:
        """Undo ``freeze_prepare`` for a freeze that never happened."""

    @abc.abstractmethod
    async def freeze(self, quiesce: str, deadline: float) -> None:
        """Quiesce the guest (``freeze`` or ``pause``); it must be thawed by *deadline*
        (unix time) whatever happens to the agent."""

    @abc.abstractmethod
    async def thaw(self, quiesce: str) -> None:
        """End the quiesce of ``freeze``; a guest already thawed is not an error.

        Raises:
            AgentError: the thaw failed; whatever ``freeze`` armed for the deadline
                stays armed.
        """

    @abc.abstractmethod
    async def attach_targets(self, members: Sequence[MemberPlan],
                             path_of: Callable[[str], Path]) -> None:
        """Before the freeze: open every member's (created, empty) target image."""

    @abc.abstractmethod
    async def start_jobs(self, members: Sequence[MemberPlan]) -> None:
        """In ONE atomic step: add every member's new checkpoint and start its copy."""

    # -------------------------------------------------------------- barrier
    @abc.abstractmethod
    async def wait_copied(self, members: Sequence[MemberPlan], timeout: float | None) -> None:
        """Wait until every member's data is copied and nothing is committed yet.

        Raises:
            QemuError: a job failed or vanished. AgentTimeoutError: not in time.
        """

    @abc.abstractmethod
    async def close_targets(self, members: Sequence[MemberPlan]) -> dict[tuple[str, str], int]:
        """End the copied jobs and let go of their targets (written and closed);
        return the bytes copied per (vm, disk)."""

    # ----------------------------------------------------- commit and abort
    @abc.abstractmethod
    async def drop_checkpoints(self, checkpoints: Sequence[tuple[str, str]]) -> None:
        """Remove (disk, checkpoint) pairs; an absent one or a lost VM is not an error."""

    @abc.abstractmethod
    async def rollback_jobs(self, members: Sequence[MemberPlan]) -> None:
        """Cancel and forget the members' jobs and targets, whatever state they are in
        (best effort: a lost VM has nothing left to roll back)."""

    # ------------------------------------------------------------- leftovers
    @abc.abstractmethod
    async def sweep(self, keep_jobs: set[str], keep_nodes: set[str],
                    keep_checkpoints: dict[str, set[str]]) -> list[str]:
        """Remove the agent's own jobs, nodes and checkpoints that are not kept (per
        disk); return what was removed."""
