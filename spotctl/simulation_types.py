"""Shared vocabulary of the simulator and the policies it runs."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol


class Kind(IntEnum):
    """What the job runs on during a tick."""

    NONE = 0  # nothing: no cost, no progress
    SPOT = 1  # a spot instance (only where the trace says spot is available)
    ON_DEMAND = 2  # an on-demand instance


@dataclass(frozen=True, slots=True)
class TickState:
    """What a policy sees at the start of a tick (times in hours from the job start)."""

    tick: int
    elapsed_hours: float
    gap_hours: float
    job_hours: float
    remaining_hours: float
    deadline_hours: float
    restart_overhead_hours: float
    migration_overhead_hours: float
    pending_overhead_hours: float  # startup still to pay by the current instance
    kind: Kind  # what ran in the previous tick (NONE after a preemption)
    az: int  # index of the AZ of the current instance (meaningless when NONE)
    volume_az: int | None  # where the data volume is; None before the first start
    available: tuple[bool, ...]  # spot available now, per AZ
    run_started_hours: float  # when the current instance started
    run_startup_hours: float  # overhead the current instance pays in all


class Policy(Protocol):
    """A per-tick decision maker the simulator drives."""

    name: str

    def reset(self, start_tick: int) -> None:
        """Forget the previous run; the next starts at ``start_tick`` of the traces."""

    def decide(self, state: TickState) -> tuple[Kind, int]:
        """Return what to run this tick and in which AZ (index into the traces)."""
        ...
