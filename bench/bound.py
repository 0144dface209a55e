"""The best an online policy can do when it knows how spot comes and goes in its AZ.

bench/optimum.py bounds every policy by one that sees the future. This bounds what an
online policy could reach without seeing it: one that knows, exactly, the distribution
of how long spells of spot capacity and outages last in the trace's AZ (fitted to the
whole trace), but not when the next one ends. Spot is modelled as alternating spells
and outages whose lengths are drawn independently from the trace's own lengths: a
semi-Markov process whose state is (spot up or not, how many ticks it has been so).
For that model, a backward dynamic program finds the policy of least expected cost
that never misses the deadline, and the simulator runs it on the real trace from the
same starts as bench/cost.py.

What it tells: spotctl is scored against Uniform Progress (issue #5: at most 0.96 of
its cost). If even this policy, which knows the distribution the trace's spells and
outages follow, cannot go far below a bar, a rule that learns that distribution online
can hardly do better: only by finding what the model leaves out (streaks of long or
short spells, say). The part of the distance to the offline optimum that it closes is
what better use of a pool's record could win. In the results' JSON, ``model_policy``
is the program's policy: with the model known, or with ``--fit-hours``, fitted.

The program, per tick (the simulator's tick, ``gap``), in the simulator's semantics:
state (ticks left, slack, what runs, spot up, its age in ticks up to ``MAX_AGE_TICKS``),
slack counted in units of about 0.0135 h (``gap / k``); a restart costs its overhead
rounded up to whole units, idling a tick costs the tick, running costs none; the last
tick is as long as the deadline leaves it. Slack is rounded down and restarts up, so
the policy is never told it has slack it has not. Slack below zero is a miss, and the
program takes no risk of one: on-demand can always finish from slack zero, and no
state of spot is taken as sure to go on, even one the trace never saw end.

Usage, from the repository root:

    .venv/bin/python bench/bound.py                # 68 scenarios: bench/results/bound.json
    .venv/bin/python bench/bound.py --trace traces/aws-02-15-2023/us-east-1c_v100_1.json \\
        --deadline-hours 52 --restart-overhead-hours 0.2 --starts 100
    .venv/bin/python bench/bound.py --fit-hours 72 --starts 10   # model from the past only

``--fit-hours H`` fits the model, for each start, to the H hours of trace before it
(what a pool record of that age holds; before the trace's first tick, its end, as the
simulator's history wraps) instead of to the whole trace: an online policy that could
be built, one program per start (slow: a few seconds each).

Default scenarios, 100 starts each: bench/cost.py's single-AZ ones, the 32 of
aws-10-26-2022 and the 36 held out of aws-02-15-2023.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.optimum import Scenario  # noqa: E402
from spotctl.simulate import (  # noqa: E402
    JobSpec,
    Trace,
    availability_rows,
    make_policy,
    simulate_run,
    start_ticks,
)
from spotctl.simulation_types import Kind, TickState  # noqa: E402

MAX_AGE_TICKS = 40
SLACK_UNIT_HOURS = 0.0135
INFEASIBLE = 1e12  # cost of a miss: no saving is worth any chance of one
NEVER_SURE = 1e-6  # the least chance a state ends in a tick
RESULTS = ROOT / "bench" / "results"
REPORT = ROOT / "docs" / "bound.md"
GROUP_NAMES = {"a": "32 single-AZ scenarios (aws-10-26-2022)", "v": "36 held out (aws-02-15-2023)"}

IDLE, ON_DEMAND, SPOT = 0, 1, 2  # decision codes
_KINDS = (Kind.NONE, Kind.ON_DEMAND, Kind.SPOT)


@dataclass(frozen=True, slots=True)
class Model:
    """``stay[a, i]``: the chance that spot's state ``a`` (0 out, 1 up), which has lasted
    ``i + 1`` ticks, lasts one more; the last column holds for every older age."""

    stay: NDArray[np.float64]


def run_lengths(unavailable: Sequence[bool]) -> list[tuple[bool, int]]:
    """(spot up, ticks) of each complete spell and outage; the first and last, cut by
    the trace's ends, are left out."""
    runs: list[tuple[bool, int]] = []
    current, length = unavailable[0], 0
    for flag in unavailable:
        if flag == current:
            length += 1
        else:
            runs.append((not current, length))
            current, length = flag, 1
    return runs[1:]


def fit_model(unavailable: Sequence[bool], max_age: int = MAX_AGE_TICKS) -> Model:
    """The model of a trace: each state's chance to go on, by age, from its run lengths.

    An age no run reached takes the chance of the age before it (0.5 when none did).
    """
    runs = run_lengths(unavailable)
    stay = np.full((2, max_age), 0.5)
    for state in (0, 1):
        lengths = np.array([n for up, n in runs if up == bool(state)], dtype=np.int64)
        for i in range(max_age):
            age = i + 1
            if i == max_age - 1:  # every older age: ticks that go on / ticks lived
                lived = np.maximum(0, lengths - age + 1).sum()
                went_on = np.maximum(0, lengths - age).sum()
            else:
                lived = (lengths >= age).sum()
                went_on = (lengths > age).sum()
            if lived:
                stay[state, i] = went_on / lived
            elif i:
                stay[state, i] = stay[state, i - 1]
    return Model(stay)


@dataclass(frozen=True, slots=True)
class Solution:
    """The program's decisions, by (ticks left, state row, age index, slack units).

    Rows: 0-1 nothing running (spot out, up); 2-3 on-demand (spot out, up); 4 spot.
    """

    decisions: NDArray[np.int8]
    start_cost: NDArray[np.float64]  # expected $ from the start, nothing running: [up, age, slack]
    gap_hours: float
    unit_hours: float
    restart_units: int
    ticks: int
    max_age: int

    def slack_units(self, hours_left: float, work_left_hours: float) -> int:
        """Slack in whole units, rounded down (never more than there is)."""
        raw = (hours_left - work_left_hours) / self.unit_hours
        return min(math.floor(raw + 1e-9), int(self.decisions.shape[-1]) - 1)

    def ticks_left(self, hours_left: float) -> int:
        """Ticks to the deadline, the last one cut short by it counted."""
        return math.ceil(hours_left / self.gap_hours - 1e-9)

    def decide(self, kind: Kind, up: bool, age: int, ticks_left: int, slack: int) -> Kind:
        if slack < 0 or ticks_left <= 0:
            return Kind.ON_DEMAND  # too late for anything else
        index = min(age, self.max_age) - 1
        if kind is Kind.SPOT and up:
            row = 4
        elif kind is Kind.ON_DEMAND:
            row = 2 + int(up)
        else:
            row = int(up)
        return _KINDS[int(self.decisions[min(ticks_left, self.ticks), row, index, slack])]


def _shift(values: NDArray[np.float64], units: int) -> NDArray[np.float64]:
    """``values`` at ``slack - units``: what is left after paying ``units`` of slack."""
    out = np.full_like(values, INFEASIBLE)
    if units < values.shape[-1]:
        out[..., units:] = values[..., : values.shape[-1] - units]
    return out


def solve(model: Model, job: JobSpec, gap_hours: float) -> Solution:
    """Backward induction over ticks left; see the module docstring for the state."""
    per_tick = max(1, round(gap_hours / SLACK_UNIT_HOURS))
    unit = gap_hours / per_tick
    restart = math.ceil(job.restart_overhead_hours / unit - 1e-9)
    ticks = math.ceil(job.deadline_hours / gap_hours - 1e-9)
    last_tick = job.deadline_hours - (ticks - 1) * gap_hours  # the deadline may cut it short
    size = math.floor((job.deadline_hours - job.job_hours) / unit + 1e-9) + 1
    ages = model.stay.shape[1]
    sigma = np.arange(size)
    older = np.minimum(np.arange(ages) + 1, ages - 1)
    # A state the record never saw end can still end: spot can go in any tick, and a
    # spot start on the belief that it cannot would risk the deadline.
    stay = np.minimum(model.stay, 1.0 - NEVER_SURE)[:, :, None]
    od, sp = job.on_demand_price, job.spot_price
    decisions = np.zeros((ticks + 1, 5, ages, size), dtype=np.int8)
    idle_v = np.zeros((2, ages, size))  # nothing running
    od_v = np.zeros((2, ages, size))  # on-demand running
    spot_v = np.zeros((ages, size))  # spot running (spot up)
    for left in range(1, ticks + 1):
        step = last_tick if left == 1 else gap_hours
        work = (left - 1) * gap_hours + last_tick - sigma * unit  # restarts paid included
        done = work <= 1e-9
        last = work <= step + 1e-9
        # Expected value of the next tick's state, by this tick's (up, age).
        e_idle = stay * idle_v[:, older, :] + (1 - stay) * idle_v[::-1, :1, :]
        e_od = stay * od_v[:, older, :] + (1 - stay) * od_v[::-1, :1, :]
        e_spot = stay[1] * spot_v[older, :] + (1 - stay[1]) * idle_v[0, :1, :]
        wait = _shift(e_idle, per_tick if left > 1 else size)  # idling through the end: a miss
        run_od = np.where(last, work * od, step * od + e_od)
        run_spot = np.where(last, work * sp, step * sp + e_spot)
        start_od = _shift(run_od, restart)
        start_spot = _shift(run_spot, restart)
        no_spot = np.full_like(start_spot, INFEASIBLE)
        spot_for = np.stack([no_spot, start_spot])  # by spot up
        new_idle, pick_idle = _best(wait, start_od, spot_for)
        new_od, pick_od = _best(wait, run_od, spot_for)
        new_spot, pick_spot = _best(wait[1], start_od[1], run_spot)
        idle_v = np.where(done, 0.0, new_idle)
        od_v = np.where(done, 0.0, new_od)
        spot_v = np.where(done, 0.0, new_spot)
        decisions[left, 0:2] = pick_idle
        decisions[left, 2:4] = pick_od
        decisions[left, 4] = pick_spot
    return Solution(decisions, idle_v, gap_hours, unit, restart, ticks, ages)


def _best(
    wait: NDArray[np.float64], od: NDArray[np.float64], spot: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.int8]]:
    """The cheapest of waiting, on-demand and spot, and which it was (ties: the first)."""
    best = np.minimum(np.minimum(wait, od), spot)
    pick = np.where(wait <= best, IDLE, np.where(od <= best, ON_DEMAND, SPOT)).astype(np.int8)
    return np.minimum(best, INFEASIBLE), pick


class ModelPolicy:
    """Runs a :class:`Solution` in the simulator (one AZ). It looks at the trace's past
    only: how long spot has been up or out."""

    name = "model-known"

    def __init__(self, solution: Solution, trace: Trace) -> None:
        self._solution = solution
        self._unavailable = trace.unavailable
        self._start = 0

    def reset(self, start_tick: int) -> None:
        self._start = start_tick

    def _age(self, tick: int) -> int:
        n = len(self._unavailable)
        now = self._unavailable[tick % n]
        age = 1
        while age < self._solution.max_age and self._unavailable[(tick - age) % n] == now:
            age += 1
        return age

    def decide(self, state: TickState) -> tuple[Kind, int]:
        s = self._solution
        hours_left = state.deadline_hours - state.elapsed_hours
        work = state.remaining_hours + state.pending_overhead_hours
        slack = s.slack_units(hours_left, work)
        ticks_left = s.ticks_left(hours_left)
        up = state.available[0]
        kind = s.decide(state.kind, up, self._age(self._start + state.tick), ticks_left, slack)
        return kind, 0


@dataclass(frozen=True, slots=True)
class Result:
    """Mean normalized costs of one scenario's runs, each policy from the same starts."""

    scenario: Scenario
    bound: float  # the program's policy
    spotctl: float
    uniform_progress: float
    misses: int  # the program's

    def as_json(self) -> dict[str, object]:
        return {
            "name": self.scenario.name,
            "group": self.scenario.group,
            "starts": self.scenario.starts,
            "model_policy": round(self.bound, 4),
            "spotctl": round(self.spotctl, 4),
            "uniform_progress": round(self.uniform_progress, 4),
            "misses": self.misses,
        }


def _past(trace: Trace, start: int, hours: float) -> list[bool]:
    n = len(trace.unavailable)
    ticks = max(1, int(hours * 3600.0 / trace.gap_seconds))
    return [trace.unavailable[(start - ticks + k) % n] for k in range(ticks)]


def evaluate(task: tuple[Scenario, float | None]) -> Result:
    """One scenario: the model of the whole trace (or of the past, per start), its
    program, and the simulator's runs from the scenario's starts, beside spotctl's and
    Uniform Progress's."""
    scenario, fit_hours = task
    trace = Trace.load(Path(scenario.files[0]))
    job = scenario.job
    gap = trace.gap_seconds / 3600.0
    rows = availability_rows([trace])
    shared = None if fit_hours else solve(fit_model(trace.unavailable), job, gap)
    costs: dict[str, list[float]] = {"bound": [], "spotctl": [], "uniform-progress": []}
    misses = 0
    for start in start_ticks(len(trace.unavailable), scenario.starts):
        solution = shared or solve(fit_model(_past(trace, start, fit_hours or 0.0)), job, gap)
        run = simulate_run([trace], job, ModelPolicy(solution, trace), start, rows=rows)
        costs["bound"].append(run.normalized_cost)
        misses += not run.met_deadline
        for name in ("spotctl", "uniform-progress"):
            other = simulate_run([trace], job, make_policy(name, [trace], job), start, rows=rows)
            costs[name].append(other.normalized_cost)
    mean = {name: statistics.mean(found) for name, found in costs.items()}
    return Result(scenario, mean["bound"], mean["spotctl"], mean["uniform-progress"], misses)


def default_scenarios(starts: int) -> list[Scenario]:
    """bench/cost.py's single-AZ scenarios: (a) aws-10-26-2022, (v) held out."""
    out: list[Scenario] = []
    for group, folder in (("a", "aws-10-26-2022"), ("v", "aws-02-15-2023")):
        for f in sorted((ROOT / "traces" / folder).glob("*.json")):
            for deadline in (52.0, 70.0):
                for overhead in (0.05, 0.2):
                    job = JobSpec(deadline_hours=deadline, restart_overhead_hours=overhead)
                    out.append(Scenario(group, (str(f),), job, starts))
    return out


def group_means(results: Sequence[Result]) -> dict[str, dict[str, float]]:
    """Per group: the three policies' mean costs, and each one's ratio to Uniform
    Progress's."""
    out: dict[str, dict[str, float]] = {}
    for group in sorted({r.scenario.group for r in results}):
        mine = [r for r in results if r.scenario.group == group]
        up = statistics.mean(r.uniform_progress for r in mine)
        bound = statistics.mean(r.bound for r in mine)
        ours = statistics.mean(r.spotctl for r in mine)
        out[group] = {
            "scenarios": len(mine),
            "model_policy": round(bound, 4),
            "spotctl": round(ours, 4),
            "uniform_progress": round(up, 4),
            "model_policy_to_uniform_progress": round(bound / up, 4),
            "spotctl_to_uniform_progress": round(ours / up, 4),
            "misses": sum(r.misses for r in mine),
        }
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--trace", type=Path, help="one trace JSON (default: the 68 scenarios)")
    parser.add_argument("--deadline-hours", type=float, default=52.0)
    parser.add_argument("--restart-overhead-hours", type=float, default=0.2)
    parser.add_argument("--starts", type=int, default=100)
    parser.add_argument("--fit-hours", type=float, default=None, help="fit to the past only")
    parser.add_argument("--group", choices=("a", "v"), help="only (a) aws-10-26-2022 or (v)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, help="JSON of a default run (bench/results/...)")
    args = parser.parse_args(argv)
    began = time.monotonic()
    if args.trace:
        job = JobSpec(
            deadline_hours=args.deadline_hours, restart_overhead_hours=args.restart_overhead_hours
        )
        path = str(args.trace.resolve())
        group = "a" if "aws-10-26-2022" in path else "v" if "aws-02-15-2023" in path else "cli"
        scenarios = [Scenario(group, (path,), job, args.starts)]
    else:
        scenarios = [s for s in default_scenarios(args.starts) if args.group in (None, s.group)]
    with Pool(args.workers) as pool:
        results = pool.map(evaluate, [(s, args.fit_hours) for s in scenarios], chunksize=1)
    elapsed = time.monotonic() - began
    label = "model known" if args.fit_hours is None else f"model fitted to {args.fit_hours:g} h"
    print(f"| scenario | {label} | spotctl | Uniform Progress | misses |")
    print("| --- | --- | --- | --- | --- |")
    for r in results:
        print(
            f"| {r.scenario.name} | {r.bound:.3f} | {r.spotctl:.3f} "
            f"| {r.uniform_progress:.3f} | {r.misses} |"
        )
    groups = group_means(results)
    for group, line in groups.items():
        print(f"group {group}: {json.dumps(line)}")
    print(f"{len(results)} scenarios in {elapsed:.0f} s on {args.workers} workers")
    if not args.trace:
        result = {
            "command": " ".join(["bench/bound.py", *(argv if argv is not None else sys.argv[1:])]),
            "runtime_seconds": round(elapsed, 1),
            "fit_hours": args.fit_hours,
            "group_means": groups,
            "scenarios": [r.as_json() for r in results],
        }
        name = "bound.json"
        if args.fit_hours is not None:
            name = f"bound-fit{args.fit_hours:g}{'-' + args.group if args.group else ''}.json"
        out = args.out or RESULTS / name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        if args.out is None and (RESULTS / "bound.json").exists():
            REPORT.write_text(report(RESULTS))
    return 0


def _summary(run: dict[str, Any], label: str) -> list[str]:
    """A run's group means: the three policies, and the ratios to Uniform Progress."""
    lines = [
        f"| scenarios | starts | Uniform Progress | spotctl | {label} | "
        f"spotctl / UP | {label} / UP | misses |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    starts = {s["group"]: s["starts"] for s in run["scenarios"]}
    for group, m in run["group_means"].items():
        lines.append(
            f"| {GROUP_NAMES.get(group, group)} | {starts[group]} "
            f"| {m['uniform_progress']:.4f} | {m['spotctl']:.4f} | {m['model_policy']:.4f} "
            f"| {m['spotctl_to_uniform_progress']:.4f} "
            f"| {m['model_policy_to_uniform_progress']:.4f} | {m['misses']} |"
        )
    return lines


def report(results: Path) -> str:
    """docs/bound.md, from the default run's JSON and any --fit-hours run's beside it."""
    known = json.loads((results / "bound.json").read_text())
    fitted = [json.loads(p.read_text()) for p in results.glob("bound-fit*.json")]
    fitted.sort(key=lambda run: (float(run["fit_hours"]), run["command"]))
    lines = [
        "# The best online policy with the model known",
        "",
        "Generated by `bench/bound.py` (do not edit by hand; method in its docstring). "
        "Cost is normalized to on-demand alone, as in `docs/cost.md`; every column of a "
        "row comes from the same runs' starts. `model known` is the policy a dynamic "
        "program finds when it knows how long spells and outages of spot last in the "
        "trace's AZ (their distribution over the whole trace) but not when the next one "
        "ends: the best any online policy could do if spot were drawn that way. "
        "`model fitted` knows only the trace's past before each start.",
        "",
        *_summary(known, "model known"),
    ]
    for run in fitted:
        lines += [
            "",
            f"Model fitted to the {run['fit_hours']:g} h of trace before each start "
            f"(`{run['command']}`, {run['runtime_seconds']:.0f} s):",
            "",
            *_summary(run, "model fitted"),
        ]
    lines += [
        "",
        "## Every scenario (model known)",
        "",
        "| group | scenario | Uniform Progress | spotctl | model known | misses |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for s in known["scenarios"]:
        lines.append(
            f"| {s['group']} | {s['name']} | {s['uniform_progress']:.3f} | {s['spotctl']:.3f} "
            f"| {s['model_policy']:.3f} | {s['misses']} |"
        )
    lines += ["", f"`{known['command']}`: {known['runtime_seconds']:.0f} s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
