"""The offline optimum (bench/optimum.py) against the simulator, on small hand-made traces."""

import itertools
import math
import random

import pytest

from bench.optimum import Infeasible, Optimum, replay
from spotctl import simulate as sim
from spotctl.simulation_types import Kind

S, OD, N = Kind.SPOT, Kind.ON_DEMAND, Kind.NONE
TEN_MINUTES = 600.0
HOUR = 3600.0


def trace(flags: str, az: str = "a", gap_seconds: float = TEN_MINUTES) -> sim.Trace:
    """'0' = spot available in that tick, '1' = not, as in the trace files."""
    return sim.Trace(az, az, gap_seconds, tuple(c == "1" for c in flags))


def random_flags(rng: random.Random, ticks: int) -> str:
    """Spells of availability and outage, a few ticks each."""
    out = ""
    flag = rng.choice("01")
    while len(out) < ticks:
        out += flag * rng.randint(1, 6)
        flag = "1" if flag == "0" else "0"
    return out[:ticks]


JOB = sim.JobSpec(
    job_hours=2.0, deadline_hours=3.0, restart_overhead_hours=0.2, migration_overhead_hours=0.25
)


def region(seed: int, azs: int, ticks: int = 36) -> list[sim.Trace]:
    rng = random.Random(seed)
    return [trace(random_flags(rng, ticks), az=f"az{i}") for i in range(azs)]


CASES = [(seed, azs) for seed in range(3) for azs in (1, 2)]


@pytest.mark.parametrize(("seed", "azs"), CASES)
def test_the_optimal_schedule_replayed_in_the_simulator_costs_the_optimum(
    seed: int, azs: int
) -> None:
    traces = region(seed, azs)
    opt = Optimum(traces, JOB)
    # gcd of 600, 720, 7200 and 10800 seconds, and of 900 (migration) with two AZs
    assert opt.unit == (60 if azs == 2 else 120)
    for start in sim.start_ticks(len(traces[0].unavailable), 6):
        cost, actions = opt.schedule(start)
        assert cost == pytest.approx(opt.cost(start), rel=1e-12)
        run = replay(traces, JOB, start, actions)
        assert run.met_deadline
        assert run.cost == pytest.approx(cost, rel=1e-9)


@pytest.mark.parametrize(("seed", "azs"), CASES)
def test_no_policy_beats_the_optimum(seed: int, azs: int) -> None:
    traces = region(seed, azs)
    opt = Optimum(traces, JOB)
    best = {
        s: opt.cost(s) / sim.on_demand_only_cost(JOB)
        for s in sim.start_ticks(len(traces[0].unavailable), 6)
    }
    for name in sim.POLICY_NAMES:
        summary = sim.simulate(traces, JOB, name, 6)
        for run in summary.runs:
            assert best[run.start_tick] <= run.normalized_cost + 1e-12, (name, run)


def test_spot_always_available_costs_one_restart_and_the_work_on_spot() -> None:
    opt = Optimum([trace("0" * 20)], JOB)
    assert opt.cost(0) == pytest.approx((2.0 + 0.2) * 0.97)
    _, actions = opt.schedule(0)
    assert set(actions) == {(S, 0)}


def test_spot_never_available_costs_on_demand_alone() -> None:
    opt = Optimum([trace("1" * 20)], JOB)
    assert opt.cost(7) / sim.on_demand_only_cost(JOB) == pytest.approx(1.0)


def test_a_deadline_shorter_than_the_work_is_infeasible() -> None:
    tight = sim.JobSpec(job_hours=2.0, deadline_hours=2.1, restart_overhead_hours=0.2)
    opt = Optimum([trace("0" * 20)], tight)
    assert math.isinf(opt.cost(0))
    with pytest.raises(Infeasible):
        opt.schedule(0)


HOURLY = sim.JobSpec(
    job_hours=3.0, deadline_hours=6.0, restart_overhead_hours=0.5, migration_overhead_hours=1.5
)


def hourly(*flags: str) -> list[sim.Trace]:
    return [trace(f, az=f"az{i}", gap_seconds=HOUR) for i, f in enumerate(flags)]


def brute_force(traces: list[sim.Trace], job: sim.JobSpec) -> float:
    """The cheapest schedule that meets the deadline, over every action per tick."""
    ticks = math.ceil(job.deadline_hours * HOUR / traces[0].gap_seconds)
    choices = [(N, 0)] + [(k, az) for k in (S, OD) for az in range(len(traces))]
    best = math.inf
    for actions in itertools.product(choices, repeat=ticks):
        if any(k is S and traces[az].unavailable[t] for t, (k, az) in enumerate(actions)):
            continue
        run = replay(traces, job, 0, actions)
        if run.met_deadline:
            best = min(best, run.cost)
    return best


def test_moving_to_another_az_pays_when_the_first_runs_dry() -> None:
    # Spot in AZ 0 for two hours, then only in AZ 1. With 2 h of slack, idling until
    # AZ 1 has spot would miss: ride AZ 0 (0.5 restart + 1.5 work), then move (1 + 0.5)
    # and do the last 1.5 h there, done at 6 h: 6 h of spot.
    job = sim.JobSpec(
        job_hours=4.0, deadline_hours=6.0, restart_overhead_hours=0.5, migration_overhead_hours=1.0
    )
    traces = hourly("001111", "110000")
    opt = Optimum(traces, job)
    cost, actions = opt.schedule(0)
    assert cost == pytest.approx(6 * 0.97)
    assert actions == [(S, 0), (S, 0), (S, 1), (S, 1), (S, 1), (S, 1)]
    assert replay(traces, job, 0, actions).migrations == 1
    assert cost == pytest.approx(brute_force(traces, job))


def test_an_abandoned_move_leaves_the_volume_behind() -> None:
    # Spot in AZ 0 for two hours, in AZ 1 at t=2 and from t=4; the move takes 1.5 h. Were
    # the volume in AZ 1 as soon as a move starts, riding AZ 0, starting the move at t=2
    # (1 h of it paid, preempted at t=3), idling, and restarting in AZ 1 at t=4 for 0.5 h
    # would finish at 6 h on 5 h of spot. Here the move is not made, t=4 owes the whole
    # 2 h again (only that second move completes, at t=6), and that schedule misses the
    # deadline. The optimum finishes in AZ 0 on on-demand: 0.5 restart + 1.5 h of work.
    traces = hourly("001111", "110100")
    loose = [(S, 0), (S, 0), (S, 1), (N, 0), (S, 1), (S, 1)]
    run = replay(traces, HOURLY, 0, loose)
    assert run.migrations == 1
    assert not run.met_deadline
    opt = Optimum(traces, HOURLY)
    cost, actions = opt.schedule(0)
    assert cost == pytest.approx(2 * 0.97 + 2 * 3.06)
    assert actions == [(S, 0), (S, 0), (OD, 0), (OD, 0)]
    assert cost == pytest.approx(brute_force(traces, HOURLY))
    assert replay(traces, HOURLY, 0, actions).cost == pytest.approx(cost)
