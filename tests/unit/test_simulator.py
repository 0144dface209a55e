"""The simulator's semantics and the baselines' behaviour, on small hand-made traces."""

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import chalicelib.policy
from spotctl import simulate as sim
from spotctl.baselines import Greedy, OnDemandOnly, UniformProgress
from spotctl.simulation_types import Kind, TickState

S, OD, N = Kind.SPOT, Kind.ON_DEMAND, Kind.NONE
HOUR = 3600.0


def trace(flags: str, gap_seconds: float = HOUR, az: str = "us-west-2a") -> sim.Trace:
    """'0' = spot available in that tick, '1' = not, as in the trace files."""
    return sim.Trace(az, az, gap_seconds, tuple(c == "1" for c in flags))


def kinds(timeline: list[tuple[Kind, int]]) -> list[Kind]:
    return [k for k, _ in timeline]


def test_trace_file_loads_with_az_from_its_name(tmp_path: Path) -> None:
    path = tmp_path / "us-east-1c_v100_1.json"
    path.write_text(json.dumps({"metadata": {"gap_seconds": 195}, "data": [0, 1, 1]}))
    loaded = sim.Trace.load(path)
    assert loaded.az == "us-east-1c"
    assert loaded.gap_seconds == 195
    assert loaded.unavailable == (False, True, True)


def test_starts_are_spread_evenly_over_the_trace() -> None:
    assert sim.start_ticks(100, 4) == [0, 25, 50, 75]
    assert sim.start_ticks(10, 1) == [0]


def test_on_demand_only_costs_exactly_the_normalizer() -> None:
    job = sim.JobSpec(job_hours=4, deadline_hours=6, restart_overhead_hours=0.5)
    run = sim.simulate_run([trace("1" * 6)], job, OnDemandOnly(), 0)
    assert run.met_deadline
    assert run.normalized_cost == pytest.approx(1.0)
    assert run.finish_hours == pytest.approx(4.5)  # one restart, then the work


def test_greedy_rides_spot_then_commits_to_on_demand_when_slack_runs_out() -> None:
    # 1 h ticks, 4 h of work, 6 h deadline, 0.5 h restarts: after the preemption at
    # t=2 an idle hour would leave 3 h for 2.5 h of work + 2 restarts, so commit.
    job = sim.JobSpec(job_hours=4, deadline_hours=6, restart_overhead_hours=0.5)
    timeline: list[tuple[Kind, int]] = []
    run = sim.simulate_run([trace("00111100")], job, Greedy(), 0, timeline)
    assert kinds(timeline) == [S, S, OD, OD, OD]
    assert run.interruptions == 1
    assert run.finish_hours == pytest.approx(5.0)
    assert run.cost == pytest.approx(2 * 0.97 + 3 * 3.06)


def test_greedy_waits_out_an_outage_while_slack_lasts() -> None:
    job = sim.JobSpec(job_hours=4, deadline_hours=8, restart_overhead_hours=0.25)
    timeline: list[tuple[Kind, int]] = []
    run = sim.simulate_run([trace("01111100")], job, Greedy(), 0, timeline)
    assert kinds(timeline) == [S, N, N, N, OD, OD, OD, OD]
    assert run.met_deadline
    assert run.finish_hours == pytest.approx(7.5)


def test_uniform_progress_catches_up_on_demand_once_behind_schedule() -> None:
    # ep(t) = t/2. Ahead at t=1 (0.75 >= 0.5): idle; behind at t=2: on-demand, kept
    # (rules 1 and 3: no spot to leave for) until the work is done.
    job = sim.JobSpec(job_hours=4, deadline_hours=8, restart_overhead_hours=0.25)
    timeline: list[tuple[Kind, int]] = []
    run = sim.simulate_run([trace("01111100")], job, UniformProgress(), 0, timeline)
    assert kinds(timeline) == [S, N, OD, OD, OD, OD]
    assert run.finish_hours == pytest.approx(5.5)


def test_uniform_progress_holds_on_demand_until_ahead_by_two_restarts() -> None:
    # ep(t) = 0.4 t, d = 0.5. t1: ahead (0.5 >= 0.4), idle; t2: behind, on-demand;
    # t3: spot is back but cp = 1.0 < ep(3 + 2d) = 1.6: hold; t4: cp = 2.0 >= 2.0: spot.
    job = sim.JobSpec(job_hours=4, deadline_hours=10, restart_overhead_hours=0.5)
    timeline: list[tuple[Kind, int]] = []
    run = sim.simulate_run([trace("0110000000")], job, UniformProgress(), 0, timeline)
    assert kinds(timeline)[:5] == [S, N, OD, OD, S]
    assert run.met_deadline


def test_preemption_restart_and_migration_are_paid_in_time_and_money() -> None:
    job = sim.JobSpec(
        job_hours=2, deadline_hours=10, restart_overhead_hours=0.5, migration_overhead_hours=1
    )

    class HopAfterPreemption:
        name = "hop"

        def reset(self, start_tick: int) -> None:
            pass

        def decide(self, state: TickState) -> tuple[Kind, int]:
            return (S, 0) if state.available[0] else (S, 1)

    timeline: list[tuple[Kind, int]] = []
    run = sim.simulate_run(
        [trace("0111111", az="a"), trace("0000000", az="b")], job, HopAfterPreemption(), 0, timeline
    )
    # t0: 0.5 restart + 0.5 work in a; t1: preempted, move to b: 0.5 restart + 1
    # migration, all of t1 and half of t2 without progress; 1.5 h left done at t=4.
    assert timeline[:2] == [(S, 0), (S, 1)]
    assert run.interruptions == 1
    assert run.migrations == 1
    assert run.finish_hours == pytest.approx(4.0)
    assert run.cost == pytest.approx(4.0 * 0.97)


class Scripted:
    """Plays a fixed (kind, AZ) per tick and records the states it was shown."""

    name = "scripted"

    def __init__(self, script: list[tuple[Kind, int]]) -> None:
        self.script = script
        self.seen: list[TickState] = []

    def reset(self, start_tick: int) -> None:
        self.seen = []

    def decide(self, state: TickState) -> tuple[Kind, int]:
        self.seen.append(state)
        return self.script[min(state.tick, len(self.script) - 1)]


def two_azs(ticks: int = 12) -> list[sim.Trace]:
    return [trace("0" * ticks, az="a"), trace("0" * ticks, az="b")]


def test_a_kind_switch_before_the_volume_arrives_pays_the_migration_again() -> None:
    job = sim.JobSpec(
        job_hours=2, deadline_hours=10, restart_overhead_hours=0.5, migration_overhead_hours=2
    )
    chooser = Scripted([(OD, 0), (OD, 1), (S, 1)])
    run = sim.simulate_run(two_azs(), job, chooser, 0)
    # t0: volume created in AZ 0, 0.5 restart + 0.5 work. t1: on-demand in AZ 1 owes
    # 2 migration + 0.5 restart, pays 1. t2: spot in AZ 1 is a new instance before the
    # volume got there: 2.5 again, paid by t=4.5; then 1.5 h of work, done at t=6.
    assert [st.volume_az for st in chooser.seen] == [None, 0, 0, 0, 1, 1]
    assert chooser.seen[3].run_startup_hours == pytest.approx(2.5)
    assert run.migrations == 1
    assert run.finish_hours == pytest.approx(6.0)
    assert run.cost == pytest.approx(2 * 3.06 + 4 * 0.97)
    # Cut short by the deadline before the second start has paid its move: no move.
    short = sim.JobSpec(
        job_hours=2, deadline_hours=3.5, restart_overhead_hours=0.5, migration_overhead_hours=2
    )
    cut = sim.simulate_run(two_azs(), short, Scripted([(OD, 0), (OD, 1), (S, 1)]), 0)
    assert not cut.met_deadline
    assert cut.migrations == 0


def test_a_preempted_move_leaves_the_volume_home() -> None:
    job = sim.JobSpec(
        job_hours=2, deadline_hours=10, restart_overhead_hours=0.5, migration_overhead_hours=2
    )
    traces = [trace("0" * 12, az="a"), trace("00" + "1" * 10, az="b")]
    chooser = Scripted([(OD, 0), (S, 1), (OD, 0)])
    run = sim.simulate_run(traces, job, chooser, 0)
    # t0: 0.5 restart + 0.5 work in AZ 0. t1: spot in AZ 1 owes 2.5, pays 1; t2: it is
    # preempted, the volume never left AZ 0, so on-demand back there pays d only.
    assert [st.volume_az for st in chooser.seen] == [None, 0, 0, 0]
    assert chooser.seen[3].run_startup_hours == pytest.approx(0.5)
    assert run.interruptions == 1
    assert run.migrations == 0
    assert run.finish_hours == pytest.approx(4.0)
    assert run.cost == pytest.approx(3 * 3.06 + 0.97)


def test_a_kind_switch_after_a_completed_move_pays_only_the_restart() -> None:
    job = sim.JobSpec(
        job_hours=3, deadline_hours=10, restart_overhead_hours=0.5, migration_overhead_hours=1
    )
    chooser = Scripted([(S, 0), (OD, 1), (OD, 1), (S, 1)])
    run = sim.simulate_run(two_azs(), job, chooser, 0)
    # t0: 0.5 restart + 0.5 work in AZ 0. t1: on-demand in AZ 1 pays the 1 h move, the
    # volume is there from t=2; 0.5 restart + 0.5 work. t3: spot in AZ 1: restart only.
    assert [st.volume_az for st in chooser.seen] == [None, 0, 1, 1, 1, 1]
    assert chooser.seen[4].run_startup_hours == pytest.approx(0.5)
    assert run.migrations == 1
    assert run.finish_hours == pytest.approx(5.5)
    assert run.cost == pytest.approx(2 * 3.06 + 3.5 * 0.97)


def test_trace_shorter_than_the_deadline_wraps_around() -> None:
    job = sim.JobSpec(job_hours=3, deadline_hours=6, restart_overhead_hours=0.0)
    timeline: list[tuple[Kind, int]] = []
    run = sim.simulate_run([trace("10")], job, Greedy(), 1, timeline)
    # Starting at tick 1 reads 0,1,0,1,...: spot at even ticks only.
    assert kinds(timeline)[:3] == [S, N, S]
    assert run.met_deadline


def test_a_missed_deadline_is_charged_the_rest_on_demand() -> None:
    job = sim.JobSpec(job_hours=4, deadline_hours=4, restart_overhead_hours=0.5)
    run = sim.simulate_run([trace("0000")], job, OnDemandOnly(), 0)
    # 4 billed hours give 3.5 h of work; the last 0.5 h is charged with a new restart.
    assert not run.met_deadline
    assert run.cost == pytest.approx((4 + 0.5 + 0.5) * 3.06)


def test_spotctl_policy_runs_the_lambdas_decide_placement(monkeypatch) -> None:
    calls = []
    real = chalicelib.policy.decide_placement

    def spy(view, now, tuning=chalicelib.policy.DEFAULT_TUNING):
        calls.append(view)
        return real(view, now, tuning)

    monkeypatch.setattr(chalicelib.policy, "decide_placement", spy)
    job = sim.JobSpec(job_hours=2, deadline_hours=4, restart_overhead_hours=0.1)
    summary = sim.simulate([trace("0011" * 4)], job, "spotctl", starts=2)
    assert summary.deadline_misses == 0
    assert len(calls) >= 4
    assert all(v.total_work_hours == 2 for v in calls)


def test_cli_prints_a_summary_and_json(tmp_path: Path, capsys) -> None:
    path = tmp_path / "us-west-2a_v100_1.json"
    path.write_text(json.dumps({"metadata": {"gap_seconds": 3600}, "data": [0, 1] * 40}))
    args = ["simulate", "--trace", str(path), "--job-hours", "4", "--deadline-hours", "6"]
    assert sim.main([*args, "--starts", "3"]) == 0
    assert "deadline misses 0/3" in capsys.readouterr().out
    assert sim.main([*args, "--starts", "2", "--json", "--policy", "greedy"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["policy"] == "greedy"
    assert len(out["runs"]) == 2


@settings(max_examples=60, deadline=None)
@given(
    flags=st.lists(st.booleans(), min_size=4, max_size=40),
    other=st.lists(st.booleans(), min_size=40, max_size=40),
    job_hours=st.floats(1.0, 8.0),
    slack=st.floats(0.5, 6.0),
    overhead=st.sampled_from([0.0, 0.05, 0.2, 0.5]),
    gap_seconds=st.sampled_from([600.0, 1800.0, 3600.0]),
    start=st.integers(0, 39),
    two_azs=st.booleans(),
    history=st.sampled_from(sim.HISTORIES),
)
def test_spotctl_never_misses_a_deadline_on_demand_could_meet(
    flags, other, job_hours, slack, overhead, gap_seconds, start, two_azs, history
) -> None:
    # The deadline leaves on-demand its one restart plus some slack: always feasible.
    job = sim.JobSpec(
        job_hours=job_hours,
        deadline_hours=job_hours + overhead + slack,
        restart_overhead_hours=overhead,
        migration_overhead_hours=0.25,
    )
    first = sim.Trace("a", "a", gap_seconds, tuple((flags * 40)[:40]))
    traces = [first, sim.Trace("b", "b", gap_seconds, tuple(other))] if two_azs else [first]
    chooser = sim.SpotctlPolicy(traces, job, history=history)
    run = sim.simulate_run(traces, job, chooser, start)
    assert run.met_deadline


def test_own_history_tells_the_policy_only_what_the_job_saw() -> None:
    # Hourly ticks. Spot up 2 h (the job rides it), down 3 h (it falls back to
    # on-demand), then up again; the fleet's record also holds the 5 h before the start.
    flags = [0, 0, 0, 0, 1] + [0, 0, 1, 1, 1] + [0] * 30
    trace = sim.Trace("us-east-1a_x", "us-east-1a", 3600.0, tuple(bool(f) for f in flags))
    job = sim.JobSpec(job_hours=20.0, deadline_hours=22.0, restart_overhead_hours=0.2)
    views: list[chalicelib.policy.PlacementView] = []

    class Recording(sim.SpotctlPolicy):
        def view(self, state: TickState) -> chalicelib.policy.PlacementView:
            views.append(super().view(state))
            return views[-1]

    own = Recording([trace], job, history="own", history_hours=5.0)
    timeline: list[tuple[Kind, int]] = []
    sim.simulate_run([trace], job, own, 5, timeline)
    assert timeline[:2] == [(Kind.SPOT, 0), (Kind.SPOT, 0)]
    first, after = views[0].pools[0], views[2].pools[0]
    # Nothing before the job's start, and never a share of time with spot.
    assert (first.interruptions, first.spell_hours, first.recent_availability) == ((), (), None)
    # The preemption at hour 2 ends a 2 h spell: one interruption, when it happened.
    assert after.spell_hours == (2.0,)
    assert [i.at for i in after.interruptions] == [sim.EPOCH0 + 2 * 3600.0]
    assert after.recent_availability is None
    # Spot back at hour 5, unseen by the job (it was on on-demand): its age is unknown.
    back = views[5].pools[0]
    assert back.spot_available and back.capacity_changed_at is None
    # ... and on-demand is left for it then, not held to the end.
    assert [kind for kind, _ in timeline[2:6]] == [Kind.ON_DEMAND] * 3 + [Kind.SPOT]

    fleet = Recording([trace], job, history_hours=5.0)
    views.clear()
    sim.simulate_run([trace], job, fleet, 5)
    # The fleet saw the outage before the start, and knows the share of time with spot.
    assert len(views[0].pools[0].interruptions) == 1
    assert views[0].pools[0].recent_availability is not None


def test_history_must_be_one_of_the_known() -> None:
    trace = sim.Trace("a", "a", 3600.0, (False,) * 8)
    with pytest.raises(ValueError, match="unknown history"):
        sim.SpotctlPolicy([trace], sim.JobSpec(), history="oracle")
