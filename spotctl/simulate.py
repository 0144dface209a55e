"""``spotctl simulate``: replay real spot availability traces against a policy.

Semantics are those of "Can't Be Late" (Wu et al., NSDI '24), as DESIGN.md fixes them:

- a trace is ``{"metadata": {"gap_seconds": G}, "data": [...]}``; tick ``i`` covers
  ``[i·G, (i+1)·G)``; ``data[i] == 1`` means spot is NOT available in that tick;
- each tick the policy picks NONE, SPOT (only where available) or ON_DEMAND; a spot
  instance in a tick whose trace says 1 is preempted at the tick's start;
- every start of a new instance (after a switch or a preemption) pays the restart
  overhead: billed time without progress; a start in another AZ than the data volume
  also pays the migration overhead, first: the volume is in the new AZ only once that
  instance has paid the migration part (snapshot + restore). An instance that ends
  before (preempted, or the policy switches kind or AZ or idles) leaves the volume
  where it was, and the next start outside that AZ pays the migration again;
- cost is billed per second at the spot or on-demand price, until the work is done;
- a run is judged by cost / cost of on-demand alone (job hours x on-demand price,
  no restart) and by whether the job finished by the deadline. A run that misses it
  is charged the rest of the work on on-demand (one restart included).

A run starting at tick ``s`` reads tick ``(s + i) mod len(trace)``: traces shorter
than the start offset plus the deadline wrap around to their beginning.

Several trace files (``--trace`` repeated) are several AZs of one region, aligned by
tick index. The baselines see only the first one; ``spotctl`` sees them all.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from itertools import accumulate
from pathlib import Path

from chalicelib import policy
from chalicelib.placement import CapacityObservation, PoolHistory, Seen, history_of
from spotctl.baselines import Greedy, OnDemandOnly, UniformProgress
from spotctl.simulation_types import Kind, Policy, TickState

EPOCH0 = 1_700_000_000.0  # simulated wall clock at the job's start (any value works)
INSTANCE_TYPE = "p3.2xlarge"
_EPS = 1e-9


@dataclass(frozen=True, slots=True)
class Trace:
    """Spot availability of one pool, one flag per tick (True = unavailable)."""

    name: str
    az: str
    gap_seconds: float
    unavailable: tuple[bool, ...]

    @classmethod
    def load(cls, path: Path) -> Trace:
        raw = json.loads(path.read_text())
        data = tuple(bool(v) for v in raw["data"])
        if not data:
            raise ValueError(f"{path}: empty trace")
        return cls(
            name=path.stem,
            az=path.stem.split("_", 1)[0],
            gap_seconds=float(raw["metadata"]["gap_seconds"]),
            unavailable=data,
        )


@dataclass(frozen=True, slots=True)
class JobSpec:
    """The job and prices of one scenario (the paper's defaults)."""

    job_hours: float = 48.0
    deadline_hours: float = 52.0
    restart_overhead_hours: float = 0.2
    migration_overhead_hours: float = 0.25
    spot_price: float = 0.97
    on_demand_price: float = 3.06


@dataclass(frozen=True, slots=True)
class RunResult:
    """One run from one start offset."""

    start_tick: int
    cost: float
    normalized_cost: float
    met_deadline: bool
    finish_hours: float
    interruptions: int
    on_demand_hours: float
    spot_hours: float
    migrations: int  # volume moves completed (a start abandoned mid-move is not one)


@dataclass(frozen=True, slots=True)
class Summary:
    """All runs of one policy on one scenario."""

    policy: str
    traces: tuple[str, ...]
    job: JobSpec
    mean_cost: float
    worst_cost: float
    deadline_misses: int
    mean_interruptions: float
    mean_on_demand_hours: float
    runs: tuple[RunResult, ...]


def on_demand_only_cost(job: JobSpec) -> float:
    """What the job costs on one on-demand instance: the work plus one restart."""
    return (job.job_hours + job.restart_overhead_hours) * job.on_demand_price


def start_ticks(trace_len: int, starts: int) -> list[int]:
    """``starts`` start offsets spread evenly over a trace."""
    return [(k * trace_len) // starts for k in range(max(1, starts))]


def availability_rows(traces: Sequence[Trace]) -> list[tuple[bool, ...]]:
    """Spot availability per tick, one flag per AZ (True = available)."""
    flags = zip(*(t.unavailable for t in traces), strict=True)
    return [tuple(not f for f in row) for row in flags]


def simulate_run(
    traces: Sequence[Trace],
    job: JobSpec,
    chooser: Policy,
    start: int,
    timeline: list[tuple[Kind, int]] | None = None,
    rows: Sequence[tuple[bool, ...]] | None = None,
) -> RunResult:
    """Run one job from tick ``start`` to completion (or the deadline) and bill it.

    ``rows`` is :func:`availability_rows` of ``traces``, when the caller has it.
    """
    gap = traces[0].gap_seconds / 3600.0
    n = len(traces[0].unavailable)
    d = job.restart_overhead_hours
    m = job.migration_overhead_hours
    if rows is None:
        rows = availability_rows(traces)
    chooser.reset(start)
    done = 0.0
    cost = 0.0
    od_hours = 0.0
    spot_hours = 0.0
    kind = Kind.NONE
    az = 0
    volume_az: int | None = None  # where the data volume is (as the policy sees it)
    moving = False  # the current instance is still paying a move of the volume to az
    pending = 0.0
    run_started = 0.0
    run_startup = 0.0
    interruptions = 0
    migrations = 0
    finish = -1.0
    tick = 0
    t = 0.0
    while t < job.deadline_hours - _EPS:
        available = rows[(start + tick) % n]
        if kind is Kind.SPOT and not available[az]:
            interruptions += 1
            kind = Kind.NONE
            pending = 0.0
            moving = False
        state = TickState(
            tick=tick,
            elapsed_hours=t,
            gap_hours=gap,
            job_hours=job.job_hours,
            remaining_hours=job.job_hours - done,
            deadline_hours=job.deadline_hours,
            restart_overhead_hours=d,
            migration_overhead_hours=m,
            pending_overhead_hours=pending,
            kind=kind,
            az=az,
            volume_az=volume_az,
            available=available,
            run_started_hours=run_started,
            run_startup_hours=run_startup,
        )
        new_kind, new_az = chooser.decide(state)
        if new_kind is Kind.SPOT and not available[new_az]:
            raise RuntimeError(f"{chooser.name} chose spot where the trace has none")
        if new_kind is Kind.NONE:
            kind = Kind.NONE
            pending = 0.0
            moving = False
        elif new_kind is not kind or new_az != az:
            # A new instance: the migration (if any) is paid first, then the restart.
            pending = d
            moving = False
            if volume_az is None:
                volume_az = new_az  # the first start creates the volume where it runs
            elif new_az != volume_az:
                pending += m
                moving = True
            kind, az = new_kind, new_az
            run_started, run_startup = t, pending
        if timeline is not None:
            timeline.append((kind, az))
        if kind is not Kind.NONE:
            price = job.spot_price if kind is Kind.SPOT else job.on_demand_price
            step = min(gap, job.deadline_hours - t)
            overhead = min(pending, step)
            pending -= overhead
            if moving and pending <= d + _EPS:
                # The migration part is paid: the volume is in the new AZ now.
                volume_az = az
                moving = False
                migrations += 1
            productive = step - overhead
            used = step
            if done + productive >= job.job_hours - _EPS:
                used = overhead + (job.job_hours - done)
                done = job.job_hours
                finish = t + used
            else:
                done += productive
            cost += used * price
            if kind is Kind.SPOT:
                spot_hours += used
            else:
                od_hours += used
            if finish >= 0.0:
                break
        tick += 1
        t = tick * gap
    met = finish >= 0.0
    if not met:
        rest = job.job_hours - done + d
        cost += rest * job.on_demand_price
        od_hours += rest
        finish = job.deadline_hours + rest
    baseline = on_demand_only_cost(job)
    return RunResult(
        start_tick=start,
        cost=cost,
        normalized_cost=cost / baseline,
        met_deadline=met,
        finish_hours=finish,
        interruptions=interruptions,
        on_demand_hours=od_hours,
        spot_hours=spot_hours,
        migrations=migrations,
    )


# What the policy is told about each pool's past (``--history``):
# - fleet: everything that happened in the trace, from ``history_hours`` before the
#   job's start, as a fleet of jobs sharing pool records would have seen it, and the
#   share of the last ``Tuning.history_window_hours`` with spot;
# - own: only what this job saw itself, replayed through the Lambda's own record code
#   (``chalicelib.placement.history_of``): its spot runs, their interruptions and the outages
#   until its next spot start; no availability share. What a lone job's Lambda knows.
HISTORIES = ("fleet", "own")


class SpotctlPolicy:
    """Drives :func:`chalicelib.policy.decide_placement`, the Lambda's own code."""

    name = "spotctl"

    def __init__(
        self,
        traces: Sequence[Trace],
        job: JobSpec,
        tuning: policy.Tuning = policy.DEFAULT_TUNING,
        history_hours: float = 24.0,
        history: str = "fleet",
    ) -> None:
        if history not in HISTORIES:
            raise ValueError(f"unknown history {history!r}; choose from {', '.join(HISTORIES)}")
        self._own = history == "own"
        self._traces = traces
        self._job = job
        self._tuning = tuning
        self._history_hours = history_hours
        self._pools = tuple(policy.Pool(INSTANCE_TYPE, t.az) for t in traces)
        # Prefix sums of available ticks over two laps, for O(1) window shares.
        self._prefix: list[list[int]] = [
            list(accumulate((not flag for flag in t.unavailable * 2), initial=0)) for t in traces
        ]
        self._index = {p: i for i, p in enumerate(self._pools)}
        self._deadline = EPOCH0 + job.deadline_hours * 3600.0
        self.reset(0)

    def reset(self, start_tick: int) -> None:
        self._start_offset = start_tick
        self._interruptions: list[list[policy.Interruption]] = [[] for _ in self._traces]
        self._frozen: list[tuple[policy.Interruption, ...]] = [() for _ in self._traces]
        self._spells: list[list[float]] = [[] for _ in self._traces]
        self._frozen_spells: list[tuple[float, ...]] = [() for _ in self._traces]
        self._outages: list[list[float]] = [[] for _ in self._traces]
        self._frozen_outages: list[tuple[float, ...]] = [() for _ in self._traces]
        self._since: list[float | None] = [None for _ in self._traces]
        self._was_available: list[bool] | None = None
        self._history_start = EPOCH0
        # The job's own record (history "own"): observations per pool, and its spot run.
        self._seen: list[list[CapacityObservation]] = [[] for _ in self._traces]
        self._histories: list[PoolHistory | None] = [None for _ in self._traces]  # of _seen
        self._spot_run: tuple[int, float, str] | None = None  # pool, start, instance id
        self._instances = 0

    def _observe(self, state: TickState) -> None:
        """Record capacity interruptions, spells and outages per pool, as the fleet's
        history would."""
        now = EPOCH0 + state.elapsed_hours * 3600.0
        if self._was_available is None:
            self._warm_up(state)
        prev = self._was_available
        assert prev is not None
        for i, avail in enumerate(state.available):
            if prev[i] and not avail:
                self._interrupted(i, now)
            if avail and not prev[i]:
                self._came_back(i, now)
            if avail != prev[i]:
                self._since[i] = now
        self._was_available = list(state.available)

    def _interrupted(self, i: int, at: float) -> None:
        """Record that spot capacity in pool ``i`` went away at ``at``."""
        self._interruptions[i].append(policy.Interruption(at, policy.InterruptionCause.CAPACITY))
        self._frozen[i] = tuple(self._interruptions[i])
        came = self._since[i]
        if came is not None:
            self._spells[i].append((at - came) / 3600.0)
            self._frozen_spells[i] = tuple(self._spells[i])

    def _came_back(self, i: int, at: float) -> None:
        """Record that spot capacity in pool ``i`` came back at ``at``."""
        went = self._since[i]
        if went is not None:
            self._outages[i].append((at - went) / 3600.0)
            self._frozen_outages[i] = tuple(self._outages[i])

    def _warm_up(self, state: TickState) -> None:
        """Give the policy the history recorded before this job started."""
        gap = state.gap_hours
        ticks = int(self._history_hours / gap)
        start = self._start_offset
        was: list[bool] = []
        for i, trace in enumerate(self._traces):
            n = len(trace.unavailable)
            prev_avail = not trace.unavailable[(start - ticks - 1) % n]
            for k in range(-ticks, 0):
                avail = not trace.unavailable[(start + k) % n]
                at = EPOCH0 + k * gap * 3600.0
                if prev_avail and not avail:
                    self._interrupted(i, at)
                if avail and not prev_avail:
                    self._came_back(i, at)
                if avail != prev_avail:
                    self._since[i] = at
                prev_avail = avail
            was.append(prev_avail)
        self._was_available = was
        self._history_start = EPOCH0 - ticks * gap * 3600.0

    def _recent_share(self, i: int, state: TickState) -> float:
        n = len(self._traces[i].unavailable)
        ticks = min(n, int(self._tuning.history_window_hours / state.gap_hours))
        end = (self._start_offset + state.tick) % n + n
        acc = self._prefix[i]
        return (acc[end] - acc[end - ticks]) / ticks

    def view(self, state: TickState) -> policy.PlacementView:
        if self._own:
            return self._own_view(state)
        self._observe(state)
        return self._view_of(state)

    def _view_of(self, state: TickState) -> policy.PlacementView:
        quotes = tuple(
            policy.PoolQuote(
                pool=pool,
                on_demand_price=self._job.on_demand_price,
                spot_price=self._job.spot_price if state.available[i] else None,
                interruptions=self._frozen[i],
                spot_available=state.available[i],
                capacity_changed_at=self._since[i],
                recent_availability=self._recent_share(i, state),
                spell_hours=self._frozen_spells[i],
                outage_hours=self._frozen_outages[i],
            )
            for i, pool in enumerate(self._pools)
        )
        current = None
        if state.kind is not Kind.NONE:
            current = policy.CurrentRun(
                pool=self._pools[state.az],
                market=policy.Market.SPOT if state.kind is Kind.SPOT else policy.Market.ON_DEMAND,
                started_at=EPOCH0 + state.run_started_hours * 3600.0,
                startup_hours=state.run_startup_hours,
                max_price=self._job.on_demand_price if state.kind is Kind.SPOT else None,
            )
        return policy.PlacementView(
            work_done_hours=state.job_hours - state.remaining_hours,
            total_work_hours=state.job_hours,
            deadline=self._deadline,
            restart_overhead_hours=state.restart_overhead_hours,
            migration_overhead_hours=state.migration_overhead_hours,
            price_cap=None,
            current=current,
            volume_az=None if state.volume_az is None else self._pools[state.volume_az].az,
            pools=quotes,
            recheck_hours=state.gap_hours,
            history_since=self._history_start,
            job_started_at=EPOCH0,
        )

    def _own_view(self, state: TickState) -> policy.PlacementView:
        """The view with each pool's history from the job's own record alone."""
        view = self._view_of(state)
        quotes = []
        for i, quote in enumerate(view.pools):
            history = self._histories[i]
            if history is None:
                history = self._histories[i] = history_of(self._seen[i])
            quotes.append(
                replace(
                    quote,
                    interruptions=history.interruptions,
                    capacity_changed_at=history.capacity_changed_at(quote.spot_available),
                    recent_availability=None,
                    spell_hours=history.spell_hours,
                    outage_hours=history.outage_hours,
                )
            )
        return replace(view, pools=tuple(quotes), history_since=EPOCH0)

    def decide(self, state: TickState) -> tuple[Kind, int]:
        now = EPOCH0 + state.elapsed_hours * 3600.0
        if self._own:
            self._note_preemption(state, now)
        placement = policy.decide_placement(self.view(state), now, self._tuning)
        if isinstance(placement, policy.Spot):
            chosen = Kind.SPOT, self._index[placement.pool]
        elif isinstance(placement, policy.OnDemand):
            chosen = Kind.ON_DEMAND, self._index[placement.pool]
        else:
            chosen = Kind.NONE, state.az if state.volume_az is None else state.volume_az
        if self._own:
            self._note_choice(state, chosen, now)
        return chosen

    def _note(self, pool: int, observation: CapacityObservation) -> None:
        self._seen[pool].append(observation)
        self._histories[pool] = None

    def _note_preemption(self, state: TickState, now: float) -> None:
        """Our spot run is gone without our choosing: the record's interruption."""
        if self._spot_run is None or state.kind is Kind.SPOT:
            return
        pool, began, instance = self._spot_run
        self._note(
            pool, CapacityObservation(Seen.INTERRUPTED, now, "sim", instance, started_at=began)
        )
        self._spot_run = None

    def _note_choice(self, state: TickState, chosen: tuple[Kind, int], now: float) -> None:
        """A spot run we end (LEFT) or start (STARTED), as the record notes them."""
        kind, az = chosen
        keeps = state.kind is Kind.SPOT and kind is Kind.SPOT and az == state.az
        if keeps:
            return
        if self._spot_run is not None:
            pool, began, instance = self._spot_run
            self._note(pool, CapacityObservation(Seen.LEFT, now, "sim", instance, started_at=began))
            self._spot_run = None
        if kind is Kind.SPOT:
            self._instances += 1
            instance = f"i-{self._instances:08x}"
            self._note(az, CapacityObservation(Seen.STARTED, now, "sim", instance))
            self._spot_run = (az, now, instance)


POLICY_NAMES = ("spotctl", "uniform-progress", "greedy", "on-demand")


def make_policy(name: str, traces: Sequence[Trace], job: JobSpec, history: str = "fleet") -> Policy:
    """A fresh policy by its CLI name (``history``: what spotctl is told, see HISTORIES)."""
    if name == "spotctl":
        return SpotctlPolicy(traces, job, history=history)
    if name == "uniform-progress":
        return UniformProgress()
    if name == "greedy":
        return Greedy()
    if name == "on-demand":
        return OnDemandOnly()
    raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICY_NAMES)}")


def simulate(
    traces: Sequence[Trace],
    job: JobSpec,
    policy_name: str,
    starts: int,
    history: str = "fleet",
) -> Summary:
    """Run a policy from ``starts`` evenly spread offsets and summarize."""
    lengths = {len(t.unavailable) for t in traces}
    gaps = {t.gap_seconds for t in traces}
    if len(lengths) != 1 or len(gaps) != 1:
        raise ValueError("traces of one region must have the same length and gap")
    used = traces if policy_name == "spotctl" else traces[:1]
    chooser = make_policy(policy_name, used, job, history)
    rows = availability_rows(used)
    runs = []
    for start in start_ticks(len(traces[0].unavailable), starts):
        runs.append(simulate_run(used, job, chooser, start, rows=rows))
    costs = [r.normalized_cost for r in runs]
    return Summary(
        policy=policy_name,
        traces=tuple(t.name for t in used),
        job=job,
        mean_cost=statistics.fmean(costs),
        worst_cost=max(costs),
        deadline_misses=sum(1 for r in runs if not r.met_deadline),
        mean_interruptions=statistics.fmean(r.interruptions for r in runs),
        mean_on_demand_hours=statistics.fmean(r.on_demand_hours for r in runs),
        runs=tuple(runs),
    )


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``spotctl simulate`` to the CLI."""
    p = subparsers.add_parser(
        "simulate",
        help="replay spot availability traces against a placement policy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--trace",
        action="append",
        required=True,
        type=Path,
        help="trace JSON file; repeat for several AZs of one region",
    )
    p.add_argument("--policy", choices=POLICY_NAMES, default="spotctl")
    p.add_argument("--job-hours", type=float, default=48.0)
    p.add_argument("--deadline-hours", type=float, default=52.0)
    p.add_argument("--restart-overhead-hours", type=float, default=0.2)
    p.add_argument("--migration-overhead-hours", type=float, default=0.25)
    p.add_argument("--spot-price", type=float, default=0.97)
    p.add_argument("--on-demand-price", type=float, default=3.06)
    p.add_argument("--starts", type=int, default=64, help="start offsets spread over the trace")
    p.add_argument(
        "--history",
        choices=HISTORIES,
        default="fleet",
        help="spotctl's view of the pools' past: the fleet's (every job's, the default) "
        "or only what this job saw itself (a lone job's Lambda)",
    )
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    """Entry point of ``spotctl simulate``; returns the process exit code."""
    traces = [Trace.load(path) for path in args.trace]
    job = JobSpec(
        job_hours=args.job_hours,
        deadline_hours=args.deadline_hours,
        restart_overhead_hours=args.restart_overhead_hours,
        migration_overhead_hours=args.migration_overhead_hours,
        spot_price=args.spot_price,
        on_demand_price=args.on_demand_price,
    )
    if job.deadline_hours < job.job_hours:
        print("the deadline is shorter than the job: no policy can meet it")
        return 2
    summary = simulate(traces, job, args.policy, args.starts, history=args.history)
    if args.json:
        print(json.dumps(asdict(summary), indent=2))
        return 0
    print(
        f"policy {summary.policy} on {', '.join(summary.traces)}: "
        f"job {job.job_hours:g} h, deadline {job.deadline_hours:g} h, "
        f"restart {job.restart_overhead_hours:g} h, migration {job.migration_overhead_hours:g} h"
    )
    print(
        f"cost / on-demand: mean {summary.mean_cost:.3f}, worst {summary.worst_cost:.3f}; "
        f"deadline misses {summary.deadline_misses}/{len(summary.runs)}; "
        f"interruptions {summary.mean_interruptions:.1f}/run; "
        f"on-demand {summary.mean_on_demand_hours:.1f} h/run"
    )
    print("start_tick  cost  met  finish_h  interruptions  od_h  spot_h  migrations")
    for r in summary.runs:
        print(
            f"{r.start_tick:10d} {r.normalized_cost:5.3f} {'yes' if r.met_deadline else 'NO':>4} "
            f"{r.finish_hours:9.2f} {r.interruptions:14d} {r.on_demand_hours:5.1f} "
            f"{r.spot_hours:7.1f} {r.migrations:11d}"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``simulate`` standalone (``python -m spotctl.simulate``)."""
    parser = argparse.ArgumentParser(prog="spotctl")
    sub = parser.add_subparsers(required=True)
    register(sub)
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
