"""bench/bound.py: the model of a trace, and the program's policy in the simulator."""

import json
import random
import statistics
from pathlib import Path

import numpy as np
import pytest

from bench.bound import ModelPolicy, Result, fit_model, group_means, report, run_lengths, solve
from bench.optimum import Scenario
from spotctl import simulate as sim
from spotctl.baselines import Greedy, UniformProgress
from spotctl.simulation_types import Policy

SMALL = sim.JobSpec(job_hours=2.0, deadline_hours=3.0, restart_overhead_hours=0.2)


def trace_of(flags: str, gap: float = 600.0) -> sim.Trace:
    """``flags``: "1" where spot is out, as in the trace files."""
    return sim.Trace("t", "t", gap, tuple(c == "1" for c in flags))


def random_flags(seed: int, ticks: int, up_stay: float, out_stay: float) -> str:
    """Spells and outages of geometric lengths (a Markov trace)."""
    rng = random.Random(seed)
    out, up = [], True
    for _ in range(ticks):
        out.append("0" if up else "1")
        if rng.random() > (up_stay if up else out_stay):
            up = not up
    return "".join(out)


def test_run_lengths_leave_out_the_runs_the_trace_cuts() -> None:
    assert run_lengths(trace_of("1000110111001").unavailable) == [
        (True, 3),
        (False, 2),
        (True, 1),
        (False, 3),
        (True, 2),
    ]


def test_the_model_is_each_states_chance_to_go_on_by_age() -> None:
    model = fit_model(trace_of("1000110111001").unavailable, max_age=3)
    # Spells of 3, 1, 2 ticks: at age 1, two of three go on; at 2, one of two;
    # at 3 and older none. Outages of 2 and 3: all go on at 1; one of two at 2.
    assert model.stay[1].tolist() == pytest.approx([2 / 3, 1 / 2, 0.0])
    assert model.stay[0].tolist() == pytest.approx([1.0, 1 / 2, 0.0])


def test_the_last_age_pools_every_older_tick_and_unseen_ages_repeat_the_last_seen() -> None:
    # Spells of 5 and 1: from age 3 on, 2 + 0 ticks went on of 3 + 0 lived.
    model = fit_model(trace_of("1000001011").unavailable, max_age=3)
    assert model.stay[1, 2] == pytest.approx(2 / 3)
    # One outage, of 1 tick: nothing reached age 2, so it keeps age 1's chance (0).
    assert model.stay[0].tolist() == pytest.approx([0.0, 0.0, 0.0])


def run_all(flags: str, job: sim.JobSpec, policy: Policy, starts: int) -> list[sim.RunResult]:
    trace = trace_of(flags)
    return [sim.simulate_run([trace], job, policy, s) for s in sim.start_ticks(len(flags), starts)]


def test_with_spot_always_up_it_rides_one_spot_instance() -> None:
    flags = "0" * 60
    solution = solve(fit_model(trace_of(flags).unavailable), SMALL, 600 / 3600)
    [run] = run_all(flags, SMALL, ModelPolicy(solution, trace_of(flags)), 1)
    assert run.met_deadline
    assert run.on_demand_hours == 0.0
    expected = (SMALL.job_hours + SMALL.restart_overhead_hours) * SMALL.spot_price
    assert run.cost == pytest.approx(expected)


def test_with_spot_never_up_it_runs_on_demand_once_and_in_time() -> None:
    flags = "1" * 60
    solution = solve(fit_model(trace_of(flags).unavailable), SMALL, 600 / 3600)
    [run] = run_all(flags, SMALL, ModelPolicy(solution, trace_of(flags)), 1)
    assert run.met_deadline
    assert run.normalized_cost == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(4))
def test_it_never_misses_even_when_the_trace_is_not_the_model(seed: int) -> None:
    fitted = random_flags(seed, 3000, up_stay=0.95, out_stay=0.6)  # long spells
    actual = random_flags(seed + 100, 3000, up_stay=0.5, out_stay=0.9)  # short ones
    job = sim.JobSpec(job_hours=4.0, deadline_hours=5.0, restart_overhead_hours=0.2)
    solution = solve(fit_model(trace_of(fitted).unavailable), job, 600 / 3600)
    runs = run_all(actual, job, ModelPolicy(solution, trace_of(actual)), 60)
    assert all(r.met_deadline for r in runs)


def test_on_the_model_it_was_solved_for_it_costs_what_it_expects_and_beats_the_baselines() -> None:
    flags = random_flags(7, 40_000, up_stay=0.85, out_stay=0.8)
    trace = trace_of(flags)
    rows = sim.availability_rows([trace])
    job = sim.JobSpec(job_hours=4.0, deadline_hours=5.0, restart_overhead_hours=0.2)
    solution = solve(fit_model(trace.unavailable), job, 600 / 3600)
    starts = sim.start_ticks(len(flags), 2000)

    def mean_cost(policy: Policy) -> float:
        runs = [sim.simulate_run([trace], job, policy, s, rows=rows) for s in starts]
        assert all(r.met_deadline for r in runs)
        return statistics.mean(r.cost for r in runs)

    # What the program expects from each start, nothing running yet.
    sigma = solution.slack_units(job.deadline_hours, job.job_hours)
    expected = []
    for s in starts:
        up = not trace.unavailable[s]
        age = 1
        while age < solution.max_age and trace.unavailable[s - age] == trace.unavailable[s]:
            age += 1
        expected.append(float(solution.start_cost[int(up), age - 1, sigma]))
    measured = mean_cost(ModelPolicy(solution, trace))
    assert measured == pytest.approx(statistics.mean(expected), rel=0.02)
    assert measured < mean_cost(UniformProgress())
    assert measured < mean_cost(Greedy())


def test_decisions_only_take_slack_the_job_has() -> None:
    job = sim.JobSpec(job_hours=2.0, deadline_hours=2.5, restart_overhead_hours=0.2)
    solution = solve(fit_model(trace_of("0101" * 30).unavailable), job, 600 / 3600)
    # 0.5 h of slack, rounded down to whole units; a restart rounded up.
    assert solution.slack_units(job.deadline_hours, job.job_hours) * solution.unit_hours <= 0.5
    assert solution.restart_units * solution.unit_hours >= 0.2
    assert np.isin(solution.decisions, (0, 1, 2)).all()


def test_it_never_counts_on_spot_lasting_even_where_the_model_never_saw_it_end() -> None:
    # Every spell in the fitted trace lasts 6 ticks: by the model, a spell younger
    # than that cannot end, and the whole job (3 ticks of work and a restart) fits in
    # one. With slack for less than two restarts, a spot start is still a risk: in the
    # trace run, spells end after one tick.
    fitted = ("000000" + "11") * 300
    actual = ("0" + "1") * 600
    job = sim.JobSpec(job_hours=0.5, deadline_hours=0.8, restart_overhead_hours=0.2)
    solution = solve(fit_model(trace_of(fitted).unavailable), job, 600 / 3600)
    runs = run_all(actual, job, ModelPolicy(solution, trace_of(actual)), 40)
    assert all(r.met_deadline for r in runs)


def test_the_tick_the_deadline_cuts_short_still_counts() -> None:
    # 4.5 ticks to the deadline: 0.25 h of slack, room for one restart (0.2 h) only if
    # the last half tick is counted.
    flags = "1" * 60
    job = sim.JobSpec(job_hours=0.5, deadline_hours=0.75, restart_overhead_hours=0.2)
    solution = solve(fit_model(trace_of(flags).unavailable), job, 600 / 3600)
    [run] = run_all(flags, job, ModelPolicy(solution, trace_of(flags)), 1)
    assert run.met_deadline
    assert run.normalized_cost == pytest.approx(1.0)


def test_group_means_and_the_report_from_them(tmp_path: Path) -> None:
    job = sim.JobSpec()
    results = [
        Result(Scenario("v", (f"/t/{name}.json",), job, 10), bound, ours, up, misses)
        for name, bound, ours, up, misses in (("x", 0.5, 0.6, 0.8, 0), ("y", 0.7, 0.8, 0.8, 1))
    ]
    means = group_means(results)["v"]
    assert means["model_policy"] == pytest.approx(0.6)
    assert means["model_policy_to_uniform_progress"] == pytest.approx(0.75)
    assert means["spotctl_to_uniform_progress"] == pytest.approx(0.875)
    assert means["misses"] == 1

    def write(name: str, fit_hours: float | None) -> None:
        run = {
            "command": f"bench/bound.py {name}",
            "runtime_seconds": 1.0,
            "fit_hours": fit_hours,
            "group_means": group_means(results),
            "scenarios": [r.as_json() for r in results],
        }
        (tmp_path / name).write_text(json.dumps(run))

    write("bound.json", None)
    write("bound-fit72.json", 72.0)
    write("bound-fit168.json", 168.0)
    text = report(tmp_path)
    assert (
        "| 36 held out (aws-02-15-2023) | 10 | 0.8000 | 0.7000 | 0.6000 | 0.8750 | 0.7500 | 1 |"
        in (text)
    )
    assert text.index("fitted to the 72 h") < text.index("fitted to the 168 h")
    assert "| v | y D52 d0.2 | 0.800 | 0.800 | 0.700 | 1 |" in text
