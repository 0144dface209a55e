"""Offline optimum: the least a job could cost on a trace if its policy knew the future.

For each start offset, an exact dynamic program finds the cheapest schedule (per tick:
idle, spot where available, or on-demand, in any AZ) that finishes the job by the
deadline, under exactly the semantics of ``spotctl/simulate.py``: restart overhead on
every new instance, a preempted spot instance stops at the tick's start, and a move to
another AZ pays the migration overhead first; the volume is there only once that part
is paid, so a move abandoned before (preemption, switch, idling) leaves it where it was.
The first start puts the volume in whichever AZ it picks. The deadline is hard: a start
from which no schedule finishes in time is reported as infeasible (the simulator's
miss penalty is not used). Costs are normalized as the simulator does, by
``on_demand_only_cost`` (work plus one restart, on-demand), over the same start offsets
(``start_ticks``).

Exact: time is counted in integer units of gcd(tick, restart overhead, migration
overhead, job, deadline) seconds (15 s for 195 s ticks with 0.2 h / 0.25 h overheads),
so pending overhead, progress and the partial last tick carry no rounding. The state at
a tick boundary is (what runs, its AZ, overhead it still owes, where the volume is) and
the lag (elapsed time minus progress), which the hard deadline bounds by deadline - job.

The result is a lower bound on the cost of any online policy, and so an upper bound on
how well one can do: it sees the whole future trace. Setting: Wu et al., "Can't Be Late:
Optimizing Spot Instance Savings under Deadlines", NSDI 2024.

Usage, from the repository root:

    .venv/bin/python bench/optimum.py     # default scenarios, writes bench/results/optimum.json
    .venv/bin/python bench/optimum.py --trace traces/aws-02-15-2023/us-east-1a_v100_1.json \\
        --deadline-hours 52 --restart-overhead-hours 0.2 --starts 100 [--json]

``--trace`` may be repeated (AZs of one region, the first start free to pick any);
``--check`` also replays each optimal schedule through ``simulate_run`` and fails
unless it bills the same (it keeps every tick's table: ~1.5 GB for four AZs).

Default scenarios, 100 starts each: (a) the 32 single-AZ scenarios of aws-10-26-2022
(every trace x deadline {52, 70} h x restart overhead {0.05, 0.2} h); (b) us-east-1a_v100_1
at 52 h with 0.2 h and 0.05 h; (c) us-east-1{a,c,d,f}_v100_1 together at 52 h / 0.2 h,
migration 0.25 h. Measured: 7.5 min of CPU in all, so about 4 min on 2 idle cores (10 min
wall on a 2-core machine shared with other jobs, load ~5); the four-AZ scenario is ~70 %.
``--held-out`` adds (v), the 36 single-AZ scenarios of aws-02-15-2023 that bench/cost.py
validates on.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cache, reduce
from multiprocessing import Pool
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from spotctl.simulate import (  # noqa: E402
    JobSpec,
    RunResult,
    Trace,
    on_demand_only_cost,
    simulate_run,
    start_ticks,
)
from spotctl.simulation_types import Kind, TickState  # noqa: E402

NO_VOLUME = -1  # before the first start there is no volume anywhere
RUNNING = (Kind.SPOT, Kind.ON_DEMAND)
_REL_TOL = 1e-9

Action = tuple[Kind, int]


class State(NamedTuple):
    """A row of the DP table: the situation at a tick boundary (lag aside)."""

    kind: Kind  # what runs (NONE: nothing, or a preempted spot instance)
    az: int  # the instance's AZ; for NONE the volume's
    pending: int  # overhead units the instance still owes
    volume: int  # where the volume is if the instance stopped now


@dataclass(frozen=True, slots=True)
class Move:
    """One decision for a tick, from any of ``sources`` into ``target``."""

    action: Action
    sources: NDArray[np.intp]  # rows the decision can be taken from
    target: int | None  # row after the tick (None: the run can only finish in it)
    productive: int  # units of progress the tick makes
    price: float  # per unit of time (0 when idle)


@dataclass(frozen=True, slots=True)
class Finish:
    """Where the cheapest schedule ends: tick, move, and lag before that tick."""

    tick: int
    move: int
    lag: int
    cost: float


class Infeasible(ValueError):
    """No schedule from this start finishes the job by the deadline."""


def _units(seconds: Sequence[float]) -> tuple[int, list[int]]:
    """The gcd unit of durations given in seconds, and each duration in that unit."""
    whole = [round(s) for s in seconds]
    if any(abs(s - w) > 1e-6 for s, w in zip(seconds, whole, strict=True)):
        raise ValueError(f"durations must be whole seconds: {seconds}")
    unit = reduce(math.gcd, whole)
    if unit <= 0:
        raise ValueError("all durations are zero")
    return unit, [w // unit for w in whole]


class Optimum:
    """The exact offline optimum of one job on one set of aligned traces."""

    def __init__(self, traces: Sequence[Trace], job: JobSpec) -> None:
        if (
            len({len(t.unavailable) for t in traces}) != 1
            or len({t.gap_seconds for t in traces}) != 1
        ):
            raise ValueError("traces of one region must have the same length and gap")
        self.traces = tuple(traces)
        self.job = job
        self.azs = len(traces)
        self.length = len(traces[0].unavailable)
        self.available: NDArray[np.bool_] = ~np.array([t.unavailable for t in traces], dtype=bool)
        migration = job.migration_overhead_hours * 3600.0 if self.azs > 1 else 0.0
        self.unit, (self.gap, self.restart, self.migration, self.work, self.deadline) = _units(
            [
                traces[0].gap_seconds,
                job.restart_overhead_hours * 3600.0,
                migration,
                job.job_hours * 3600.0,
                job.deadline_hours * 3600.0,
            ]
        )
        self.ticks = -(-self.deadline // self.gap)  # the last one may be partial
        self.max_lag = self.deadline - self.work
        self.price = {
            Kind.SPOT: job.spot_price * self.unit / 3600.0,
            Kind.ON_DEMAND: job.on_demand_price * self.unit / 3600.0,
        }
        self.states = self._enumerate_states()
        self.row = {s: i for i, s in enumerate(self.states)}
        self.no_volume_row = self.row[State(Kind.NONE, NO_VOLUME, 0, NO_VOLUME)]
        self._moves: dict[tuple[int, tuple[bool, ...]], list[Move]] = {}

    def _enumerate_states(self) -> list[State]:
        overheads = [self.restart] + ([self.restart + self.migration] if self.azs > 1 else [])
        # What an instance can still owe at a tick boundary: a start's overhead less whole ticks.
        owed = {ov - k * self.gap for ov in overheads for k in range(ov // self.gap + 1)}
        pendings = sorted({p for p in owed if p > 0} | {0})
        states = [State(Kind.NONE, NO_VOLUME, 0, NO_VOLUME)]
        states += [State(Kind.NONE, v, 0, v) for v in range(self.azs)]
        for kind in RUNNING:
            for az in range(self.azs):
                for p in pendings:
                    if p <= self.restart:
                        states.append(State(kind, az, p, az))
                    else:  # still paying a move: the volume is elsewhere
                        states += [State(kind, az, p, v) for v in range(self.azs) if v != az]
        return states

    def step(self, tick: int) -> int:
        """Units of time in tick ``tick`` (the last one stops at the deadline)."""
        return min(self.gap, self.deadline - tick * self.gap)

    def moves(self, tick: int, start: int) -> list[Move]:
        """Every decision of tick ``tick`` of a run starting at ``start``."""
        step = self.step(tick)
        available = tuple(bool(a) for a in self.available[:, (start + tick) % self.length])
        key = (step, available)
        if key not in self._moves:
            self._moves[key] = self._build_moves(step, available)
        return self._moves[key]

    def _rows(self, volume: int, exclude: tuple[Kind, int] | None = None) -> NDArray[np.intp]:
        return np.array(
            [
                i
                for i, s in enumerate(self.states)
                if s.volume == volume and (exclude is None or (s.kind, s.az) != exclude)
            ],
            dtype=np.intp,
        )

    def _after(self, kind: Kind, az: int, owed: int, volume: int, step: int) -> tuple[int, int]:
        """(row after the tick or -1, productive units) for an instance owing ``owed``."""
        paid = min(owed, step)
        left = owed - paid
        # The volume arrives once the migration part is paid (the restart part is last).
        where = az if left <= self.restart else volume
        return self.row.get(State(kind, az, left, where), -1), step - paid

    def _build_moves(self, step: int, available: tuple[bool, ...]) -> list[Move]:
        moves = [Move((Kind.NONE, 0), np.array([self.no_volume_row]), self.no_volume_row, 0, 0.0)]
        for v in range(self.azs):
            idle = self.row[State(Kind.NONE, v, 0, v)]
            moves.append(Move((Kind.NONE, v), self._rows(v), idle, 0, 0.0))
        for kind in RUNNING:
            price = self.price[kind]
            for az in range(self.azs):
                if kind is Kind.SPOT and not available[az]:
                    continue  # a spot instance here is preempted: only its NONE rows go on
                action = (kind, az)
                for r, s in enumerate(self.states):  # the same instance goes on
                    if (s.kind, s.az) == action:
                        target, productive = self._after(kind, az, s.pending, s.volume, step)
                        moves.append(Move(action, np.array([r]), _opt(target), productive, price))
                for v in [NO_VOLUME, *range(self.azs)]:  # a new instance
                    if v == NO_VOLUME:
                        sources = np.array([self.no_volume_row])
                    else:
                        sources = self._rows(v, exclude=action)
                    owed = self.restart + (self.migration if v not in (NO_VOLUME, az) else 0)
                    volume = az if v == NO_VOLUME else v
                    target, productive = self._after(kind, az, owed, volume, step)
                    moves.append(Move(action, sources, _opt(target), productive, price))
        return moves

    def _forward(self, start: int, keep: bool) -> tuple[Finish | None, list[NDArray[np.float64]]]:
        width = self.max_lag + 1
        if width <= 0:
            return None, []
        lags = np.arange(width)
        table = np.full((len(self.states), width), np.inf)
        table[self.no_volume_row, 0] = 0.0
        history = [table] if keep else []
        best: Finish | None = None
        for tick in range(self.ticks):
            step, elapsed = self.step(tick), tick * self.gap
            following = np.full_like(table, np.inf)
            for i, move in enumerate(self.moves(tick, start)):
                x = table[move.sources].min(axis=0)
                if move.price > 0.0:
                    last = min(elapsed + move.productive - self.work, self.max_lag)
                    if last >= 0:  # lags up to `last` finish the work in this tick
                        remaining = self.work - elapsed + lags[: last + 1]
                        finish = x[: last + 1] + (step - move.productive + remaining) * move.price
                        j = int(np.argmin(finish))
                        if finish[j] < (math.inf if best is None else best.cost):
                            best = Finish(tick, i, j, float(finish[j]))
                        x[: last + 1] = np.inf
                shift = step - move.productive
                if move.target is not None and shift < width:
                    out = following[move.target, shift:]
                    np.minimum(out, x[: width - shift] + step * move.price, out=out)
            table = following
            if keep:
                history.append(table)
            if not np.isfinite(table).any():
                break
        return best, history

    def cost(self, start: int) -> float:
        """The optimal cost in dollars of a run from tick ``start`` (inf if infeasible)."""
        best, _ = self._forward(start, keep=False)
        return math.inf if best is None else best.cost

    def schedule(self, start: int) -> tuple[float, list[Action]]:
        """The optimal cost and one optimal schedule (an action per tick) from ``start``."""
        best, history = self._forward(start, keep=True)
        if best is None:
            raise Infeasible(f"no schedule from tick {start} meets the deadline")
        move = self.moves(best.tick, start)[best.move]
        before = history[best.tick]
        row = int(move.sources[np.argmin(before[move.sources, best.lag])])
        lag = best.lag
        actions = [move.action]
        for tick in range(best.tick - 1, -1, -1):
            row, lag, action = self._predecessor(tick, start, row, lag, history)
            actions.append(action)
        if (row, lag) != (self.no_volume_row, 0):
            raise AssertionError(f"backtrack from tick {start} ended at {self.states[row]}")
        actions.reverse()
        return best.cost, actions

    def _predecessor(
        self, tick: int, start: int, row: int, lag: int, history: list[NDArray[np.float64]]
    ) -> tuple[int, int, Action]:
        """A (row, lag, action) at tick ``tick`` that leads to ``row, lag`` at its end."""
        value = history[tick + 1][row, lag]
        before = history[tick]
        step, elapsed = self.step(tick), tick * self.gap
        for move in self.moves(tick, start):
            prior = lag - (step - move.productive)
            if move.target != row or prior < 0:
                continue
            if move.price > 0.0 and prior <= elapsed + move.productive - self.work:
                continue  # that run finishes in this tick instead
            want = value - step * move.price
            for r in move.sources:
                if abs(before[r, prior] - want) <= _REL_TOL * max(1.0, abs(value)):
                    return int(r), prior, move.action
        raise AssertionError(f"no predecessor of {self.states[row]} at tick {tick}")


def _opt(row: int) -> int | None:
    return None if row < 0 else row


class Scripted:
    """Replays a fixed schedule, one action per tick, through the simulator."""

    name = "optimum"

    def __init__(self, actions: Sequence[Action]) -> None:
        self._actions = actions

    def reset(self, start_tick: int) -> None:
        """Nothing to forget: the schedule is fixed."""

    def decide(self, state: TickState) -> Action:
        kind, az = self._actions[state.tick]
        if kind is Kind.NONE:
            return Kind.NONE, state.az if state.volume_az is None else state.volume_az
        return kind, az


def replay(
    traces: Sequence[Trace], job: JobSpec, start: int, actions: Sequence[Action]
) -> RunResult:
    """Run a schedule through :func:`spotctl.simulate.simulate_run`."""
    return simulate_run(traces, job, Scripted(actions), start)


# -- the benchmark ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Scenario:
    """One job on one set of traces."""

    group: str
    files: tuple[str, ...]
    job: JobSpec
    starts: int

    @property
    def name(self) -> str:
        azs = "+".join(Path(f).stem for f in self.files)
        j = self.job
        move = f" m{j.migration_overhead_hours:g}" if len(self.files) > 1 else ""
        return f"{azs} D{j.deadline_hours:g} d{j.restart_overhead_hours:g}{move}"


@dataclass(slots=True)
class Outcome:
    """The optimum of one scenario over its start offsets."""

    scenario: Scenario
    unit_seconds: int
    start_ticks: list[int]
    normalized_costs: list[float] = field(default_factory=list)

    @property
    def feasible(self) -> list[float]:
        return [c for c in self.normalized_costs if math.isfinite(c)]

    @property
    def infeasible(self) -> int:
        return len(self.normalized_costs) - len(self.feasible)

    def as_json(self) -> dict[str, Any]:
        ok = self.feasible
        return {
            "group": self.scenario.group,
            "name": self.scenario.name,
            "traces": [_shown(f) for f in self.scenario.files],
            "job": asdict(self.scenario.job),
            "unit_seconds": self.unit_seconds,
            "starts": len(self.start_ticks),
            "mean": statistics.fmean(ok) if ok else None,
            "worst": max(ok) if ok else None,
            "best": min(ok) if ok else None,
            "infeasible": self.infeasible,
            "start_ticks": self.start_ticks,
            "normalized_costs": [
                round(c, 6) if math.isfinite(c) else None for c in self.normalized_costs
            ],
        }


def _shown(path: str) -> str:
    """A trace's path relative to the repository when it is inside it."""
    p = Path(path)
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else path


@cache
def optimum_for(files: tuple[str, ...], job: JobSpec) -> Optimum:
    """The optimum of a scenario's traces and job, built once per process."""
    return Optimum([Trace.load(Path(f)) for f in files], job)


def _solve(task: tuple[Scenario, int, bool]) -> tuple[Scenario, int, float]:
    """One start of one scenario, normalized (run in a worker)."""
    scenario, start, check = task
    opt = optimum_for(scenario.files, scenario.job)
    if check:
        try:
            cost, actions = opt.schedule(start)
        except Infeasible:
            return scenario, start, math.inf
        run = replay(opt.traces, scenario.job, start, actions)
        if not run.met_deadline or not math.isclose(run.cost, cost, rel_tol=1e-9):
            raise AssertionError(f"{scenario.name} start {start}: replay {run} != {cost}")
    else:
        cost = opt.cost(start)
    return scenario, start, cost / on_demand_only_cost(scenario.job)


def evaluate(scenarios: Sequence[Scenario], workers: int, check: bool) -> list[Outcome]:
    """The optimum of every scenario at every start, spread over ``workers`` processes."""
    outcomes: dict[Scenario, Outcome] = {}
    tasks: list[tuple[Scenario, int, bool]] = []
    for sc in scenarios:
        opt = optimum_for(sc.files, sc.job)
        ticks = start_ticks(opt.length, sc.starts)
        outcomes[sc] = Outcome(sc, opt.unit, ticks)
        tasks += [(sc, s, check) for s in ticks]
    tasks.sort(key=lambda t: -len(t[0].files))  # the slow multi-AZ starts first
    with Pool(workers) as pool:
        solved = pool.map(_solve, tasks, chunksize=1)
    by_start = {(sc, s): c for sc, s, c in solved}
    for sc, out in outcomes.items():
        out.normalized_costs = [by_start[sc, s] for s in out.start_ticks]
    return list(outcomes.values())


def default_scenarios(starts: int, held_out: bool = False) -> list[Scenario]:
    """(a) single AZ, aws-10-26-2022; (b) us-east-1a alone; (c) the four us-east-1 AZs;
    with ``held_out``, (v): every single AZ of aws-02-15-2023 (bench/cost.py's validation
    scenarios)."""
    single = sorted(str(p) for p in (ROOT / "traces" / "aws-10-26-2022").glob("*.json"))
    east = ROOT / "traces" / "aws-02-15-2023"
    east_1a = str(east / "us-east-1a_v100_1.json")
    four = tuple(str(east / f"us-east-1{z}_v100_1.json") for z in "acdf")
    out = [
        Scenario("a", (f,), JobSpec(deadline_hours=dl, restart_overhead_hours=oh), starts)
        for f in single
        for dl in (52.0, 70.0)
        for oh in (0.05, 0.2)
    ]
    out += [
        Scenario("b", (east_1a,), JobSpec(deadline_hours=52.0, restart_overhead_hours=oh), starts)
        for oh in (0.2, 0.05)
    ]
    out.append(
        Scenario(
            "c",
            four,
            JobSpec(deadline_hours=52.0, restart_overhead_hours=0.2, migration_overhead_hours=0.25),
            starts,
        )
    )
    if held_out:
        out += [
            Scenario("v", (str(f),), JobSpec(deadline_hours=dl, restart_overhead_hours=oh), starts)
            for f in sorted(east.glob("*.json"))
            for dl in (52.0, 70.0)
            for oh in (0.05, 0.2)
        ]
    return out


def table(outcomes: Sequence[Outcome]) -> list[str]:
    """A plain-text table of the per-scenario means and the means of group (a)."""
    lines = [f"{'scenario':<58} {'mean':>6} {'worst':>6} {'best':>6} {'infeasible':>10}"]
    for out in outcomes:
        ok = out.feasible
        mean, worst, best = (
            (statistics.fmean(ok), max(ok), min(ok)) if ok else (math.nan, math.nan, math.nan)
        )
        lines.append(
            f"{out.scenario.group + ' ' + out.scenario.name:<58} {mean:6.4f} {worst:6.4f} "
            f"{best:6.4f} {out.infeasible:>7}/{len(out.normalized_costs)}"
        )
    for label, value in group_means(outcomes).items():
        lines.append(f"{label:<58} {value:6.4f}")
    return lines


def group_means(outcomes: Sequence[Outcome]) -> dict[str, float]:
    """Mean over the scenarios of group (a), overall and per deadline / overhead, and
    of group (v) when it was run."""
    means: dict[str, float] = {}
    held_out = [o for o in outcomes if o.scenario.group == "v" and o.feasible]
    if held_out:
        means["v overall mean"] = statistics.fmean(statistics.fmean(o.feasible) for o in held_out)
    single = [o for o in outcomes if o.scenario.group == "a" and o.feasible]
    if not single:
        return means
    means["a overall mean"] = statistics.fmean(statistics.fmean(o.feasible) for o in single)
    for dl in (52.0, 70.0):
        for oh in (0.05, 0.2):
            some = [
                statistics.fmean(o.feasible)
                for o in single
                if (o.scenario.job.deadline_hours, o.scenario.job.restart_overhead_hours)
                == (dl, oh)
            ]
            if some:
                means[f"a mean at deadline {dl:g} h, overhead {oh:g} h"] = statistics.fmean(some)
    return means


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        epilog="See the module docstring for the semantics and the default scenarios.",
    )
    parser.add_argument(
        "--trace", action="append", type=Path, help="trace JSON; repeat for AZs of one region"
    )
    parser.add_argument("--job-hours", type=float, default=48.0)
    parser.add_argument("--deadline-hours", type=float, default=52.0)
    parser.add_argument("--restart-overhead-hours", type=float, default=0.2)
    parser.add_argument("--migration-overhead-hours", type=float, default=0.25)
    parser.add_argument("--spot-price", type=float, default=0.97)
    parser.add_argument("--on-demand-price", type=float, default=3.06)
    parser.add_argument("--starts", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--check", action="store_true", help="replay each optimum in simulate")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument(
        "--held-out",
        action="store_true",
        help="also the 36 single-AZ scenarios of aws-02-15-2023 (about 9 more minutes)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "bench" / "results" / "optimum.json",
        help="where the default run writes its JSON",
    )
    args = parser.parse_args(argv)
    began = time.monotonic()
    if args.trace:
        job = JobSpec(
            job_hours=args.job_hours,
            deadline_hours=args.deadline_hours,
            restart_overhead_hours=args.restart_overhead_hours,
            migration_overhead_hours=args.migration_overhead_hours,
            spot_price=args.spot_price,
            on_demand_price=args.on_demand_price,
        )
        files = tuple(str(p.resolve()) for p in args.trace)
        scenarios = [Scenario("cli", files, job, args.starts)]
    else:
        scenarios = default_scenarios(args.starts, args.held_out)
    outcomes = evaluate(scenarios, args.workers, args.check)
    elapsed = time.monotonic() - began
    result = {
        "command": " ".join(["bench/optimum.py", *(argv or sys.argv[1:])]),
        "runtime_seconds": round(elapsed, 1),
        "workers": args.workers,
        "group_means": group_means(outcomes),
        "scenarios": [o.as_json() for o in outcomes],
    }
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print("\n".join(table(outcomes)))
        print(f"normalized by on-demand alone; {elapsed:.0f} s on {args.workers} workers")
    if not args.trace:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        if not args.json:
            print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
