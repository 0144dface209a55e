"""The policies we compare against, from Wu et al., "Can't Be Late" (NSDI '24).

They see one pool (the job's first AZ) and decide per tick between idle, spot and
on-demand, as in the paper. Written from the rules stated in the paper; the tick
rounding of the safety net is ours (see ``_must_commit``).

- on-demand: always on-demand.
- greedy: spot whenever it is there; on-demand only once waiting one more tick could
  no longer leave room for two restarts, then on-demand to the end.
- Uniform Progress: expected progress ep(t) = C(0)·t/R(0).
  1. idle and cp(t) < ep(t): go on-demand (catch up);
  2. spot available: take it, even when behind; stay on it until preempted;
  3. hysteresis: on on-demand, stay until cp(t) >= ep(t + 2d) and spot is there;
  4. safety net: idle and R(t) < C(t) + 2d: on-demand until the end.
"""

from __future__ import annotations

from spotctl.simulation_types import Kind, TickState


def _must_commit(state: TickState) -> bool:
    """Safety net: one more idle tick would leave less than two restarts of slack."""
    left = state.deadline_hours - state.elapsed_hours
    return left - state.gap_hours < state.remaining_hours + 2.0 * state.restart_overhead_hours


class OnDemandOnly:
    """Always on-demand: the cost every other policy is normalized by."""

    name = "on-demand"

    def reset(self, start_tick: int) -> None:
        """Nothing to forget between runs."""

    def decide(self, state: TickState) -> tuple[Kind, int]:
        return Kind.ON_DEMAND, 0


class Greedy:
    """Spot whenever available; on-demand to the end once the deadline forces it."""

    name = "greedy"

    def __init__(self) -> None:
        self._committed = False

    def reset(self, start_tick: int) -> None:
        self._committed = False

    def decide(self, state: TickState) -> tuple[Kind, int]:
        if self._committed:
            return Kind.ON_DEMAND, 0
        if state.kind is Kind.SPOT and state.available[0]:
            return Kind.SPOT, 0  # riding spot spends no slack
        if _must_commit(state):
            self._committed = True
            return Kind.ON_DEMAND, 0
        if state.available[0]:
            return Kind.SPOT, 0
        return Kind.NONE, 0


class UniformProgress:
    """The paper's Uniform Progress: steady progress, spot when there, hysteresis on OD."""

    name = "uniform-progress"

    def __init__(self) -> None:
        self._committed = False

    def reset(self, start_tick: int) -> None:
        self._committed = False

    def decide(self, state: TickState) -> tuple[Kind, int]:
        if self._committed:
            return Kind.ON_DEMAND, 0
        rate = state.job_hours / state.deadline_hours
        progress = state.job_hours - state.remaining_hours
        t = state.elapsed_hours
        if state.kind is Kind.ON_DEMAND:
            # Rule 3 (hysteresis) before rule 2: on-demand holds until ahead by 2d, and
            # it is left only for spot (rule 1's "stay on it"), never for idling.
            ahead = progress >= rate * (t + 2.0 * state.restart_overhead_hours)
            if not (ahead and state.available[0]):
                return Kind.ON_DEMAND, 0
        if state.kind is Kind.SPOT and state.available[0]:
            return Kind.SPOT, 0  # rule 2: stay until preempted
        if state.kind is not Kind.ON_DEMAND and _must_commit(state):
            self._committed = True  # rule 4
            return Kind.ON_DEMAND, 0
        if state.available[0]:
            return Kind.SPOT, 0  # rule 2
        if progress < rate * t:
            return Kind.ON_DEMAND, 0  # rule 1
        return Kind.NONE, 0
