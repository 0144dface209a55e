"""bench/gap.py's accounting of a run's hours, on small hand-made traces."""

import json
import random
from pathlib import Path

import pytest

from bench.gap import Hours, account, compare, premium_cost
from bench.optimum import Scenario, Scripted
from spotctl import simulate as sim
from spotctl.simulation_types import Kind

S, OD, N = Kind.SPOT, Kind.ON_DEMAND, Kind.NONE
TICK = 1.0 / 6.0  # ten-minute ticks, in hours


def test_each_tick_is_counted_by_what_ran_and_whether_the_trace_had_spot() -> None:
    trace = sim.Trace("t", "t", 600.0, tuple(c == "1" for c in "001100000000"))
    job = sim.JobSpec(job_hours=1.0, deadline_hours=2.0, restart_overhead_hours=0.1)
    script = [S, S, OD, OD, OD, N, S, S, S, S, S, S]
    timeline: list[tuple[Kind, int]] = []
    run = sim.simulate_run([trace], job, Scripted([(k, 0) for k in script]), 0, timeline)
    hours = account(trace, job, 0, timeline, run)
    # Progress: two spot ticks less a restart, three on-demand ticks less a restart
    # (0.6333 h done), an idle tick, then spot from tick 6 less a restart: the last
    # 0.1333 h of work ends 0.1333 h into tick 8, at 1.4667 h.
    assert run.finish_hours == pytest.approx(8 * TICK + 0.1333, abs=1e-3)
    assert hours.spot == pytest.approx(4 * TICK + 0.1333, abs=1e-3)
    assert hours.od_outage == pytest.approx(2 * TICK)  # ticks 2 and 3: the trace had none
    assert hours.od_spot_up == pytest.approx(TICK)  # tick 4: spot was back
    assert hours.idle == pytest.approx(TICK)
    assert hours.starts == 3
    assert hours.unspent == pytest.approx(2.0 - run.finish_hours)
    assert hours.spot == pytest.approx(run.spot_hours)
    assert hours.od_spot_up + hours.od_outage == pytest.approx(run.on_demand_hours)


def test_premium_cost_prices_extra_on_demand_hours_at_the_premium_over_spot() -> None:
    job = sim.JobSpec()
    ours, best = Hours(cost=0.7, od_spot_up=5.0), Hours(cost=0.6, od_spot_up=3.0)
    expected = 2.0 * (job.on_demand_price - job.spot_price) / sim.on_demand_only_cost(job)
    assert premium_cost(ours, best, job) == pytest.approx(expected)


@pytest.mark.parametrize("seed", range(3))
def test_spotctl_and_the_optimum_are_accounted_alike_and_the_optimum_costs_no_more(
    tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    flags = ""
    while len(flags) < 48:
        flags += rng.choice("01") * rng.randint(1, 6)
    path = tmp_path / "az_trace.json"
    path.write_text(json.dumps({"metadata": {"gap_seconds": 600}, "data": list(map(int, flags))}))
    job = sim.JobSpec(job_hours=2.0, deadline_hours=3.0, restart_overhead_hours=0.2)
    scenario = Scenario("t", (str(path),), job, 4)
    for start in sim.start_ticks(len(flags), 4):
        ours, best = compare(scenario, start)
        assert best.cost <= ours.cost + 1e-12
        for h in (ours, best):
            busy = h.spot + h.od_spot_up + h.od_outage + h.idle
            assert busy + h.unspent == pytest.approx(job.deadline_hours)
