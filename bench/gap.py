"""Where spotctl's cost goes, hour by hour, beside the offline optimum's.

bench/cost.py says how far spotctl is from the offline optimum; this says where the
distance lies. For each single-AZ scenario and start, spotctl's run and the optimum's
schedule (bench/optimum.py) both go through the simulator, and each run's hours are
sorted by what the job was doing and whether the trace had spot then:

- spot: hours billed on spot (restarts included);
- on-demand, spot up: on-demand while the job's AZ had spot. The optimum does this only
  where a spell is too short to pay for its restarts; an online policy also for spot it
  cannot yet tell from a flicker, and for slack it keeps in reserve;
- on-demand, outage: on-demand while spot was out, the one way to buy time back;
- idle: waiting, each hour of it an hour of slack spent;
- starts: instances started (each pays the restart overhead);
- unspent: slack left when the job finished (deadline minus finish), bought and not used.

Usage, from the repository root:

    .venv/bin/python bench/gap.py                    # 68 scenarios, 25 starts: docs/gap.md
    .venv/bin/python bench/gap.py --trace traces/aws-02-15-2023/us-east-1c_v100_1.json \\
        --deadline-hours 52 --restart-overhead-hours 0.2 --starts 25

The default scenarios are bench/cost.py's single-AZ ones: the 32 of aws-10-26-2022 and
the 36 held-out ones of aws-02-15-2023.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from multiprocessing import Pool
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.optimum import Scenario, Scripted, default_scenarios, optimum_for  # noqa: E402
from spotctl.simulate import (  # noqa: E402
    JobSpec,
    RunResult,
    Trace,
    make_policy,
    on_demand_only_cost,
    simulate_run,
    start_ticks,
)
from spotctl.simulation_types import Kind  # noqa: E402

Timeline = list[tuple[Kind, int]]


@dataclass(frozen=True, slots=True)
class Hours:
    """One run's hours by what the job did, and its cost normalized to on-demand."""

    cost: float
    spot: float = 0.0
    od_spot_up: float = 0.0
    od_outage: float = 0.0
    idle: float = 0.0
    starts: float = 0.0
    unspent: float = 0.0


COLUMNS = {
    "cost": "cost",
    "spot": "spot h",
    "od_spot_up": "on-demand h, spot up",
    "od_outage": "on-demand h, outage",
    "idle": "idle h",
    "starts": "starts",
    "unspent": "unspent slack h",
}


def account(trace: Trace, job: JobSpec, start: int, timeline: Timeline, run: RunResult) -> Hours:
    """Sort a single-AZ run's ticks (``simulate_run``'s timeline) into :class:`Hours`."""
    gap = trace.gap_seconds / 3600.0
    n = len(trace.unavailable)
    end = min(run.finish_hours, job.deadline_hours)
    spot = od_up = od_out = idle = 0.0
    starts = 0
    previous = Kind.NONE
    for i, (kind, _az) in enumerate(timeline):
        hours = max(0.0, min(gap, end - i * gap))
        spot_up = not trace.unavailable[(start + i) % n]
        if kind is Kind.SPOT:
            spot += hours
        elif kind is Kind.ON_DEMAND:
            if spot_up:
                od_up += hours
            else:
                od_out += hours
        else:
            idle += hours
        # A spot instance is preempted in a tick without spot, so spot in two ticks in
        # a row is one instance; any other change of kind starts a new one.
        if kind is not Kind.NONE and kind is not previous:
            starts += 1
        previous = kind
    return Hours(
        cost=run.normalized_cost,
        spot=spot,
        od_spot_up=od_up,
        od_outage=od_out,
        idle=idle,
        starts=starts,
        unspent=max(0.0, job.deadline_hours - run.finish_hours) if run.met_deadline else 0.0,
    )


def compare(scenario: Scenario, start: int) -> tuple[Hours, Hours]:
    """spotctl's run and the optimum's from ``start``, accounted the same way."""
    opt = optimum_for(scenario.files, scenario.job)
    trace, job = opt.traces[0], scenario.job
    ours: Timeline = []
    run = simulate_run(opt.traces, job, make_policy("spotctl", opt.traces, job), start, ours)
    _, actions = opt.schedule(start)
    best: Timeline = []
    best_run = simulate_run(opt.traces, job, Scripted(actions), start, best)
    return account(trace, job, start, ours, run), account(trace, job, start, best, best_run)


def _compare(task: tuple[Scenario, int]) -> tuple[Scenario, int, Hours, Hours]:
    scenario, start = task
    return (scenario, start, *compare(scenario, start))


def mean(rows: Sequence[Hours]) -> Hours:
    """The field-wise mean of some runs."""
    return Hours(
        **{f.name: statistics.fmean(getattr(r, f.name) for r in rows) for f in fields(Hours)}
    )


def evaluate(scenarios: Sequence[Scenario], workers: int) -> dict[Scenario, tuple[Hours, Hours]]:
    """Per scenario: the mean of spotctl's runs and of the optimum's, over its starts."""
    tasks = []
    for sc in scenarios:
        ticks = start_ticks(len(optimum_for(sc.files, sc.job).traces[0].unavailable), sc.starts)
        tasks += [(sc, s) for s in ticks]
    with Pool(workers) as pool:
        done = pool.map(_compare, tasks, chunksize=4)
    out: dict[Scenario, tuple[Hours, Hours]] = {}
    for sc in scenarios:
        ours = [o for s, _, o, _ in done if s == sc]
        best = [b for s, _, _, b in done if s == sc]
        out[sc] = (mean(ours), mean(best))
    return out


def premium_cost(ours: Hours, best: Hours, job: JobSpec) -> float:
    """What spotctl's extra on-demand hours while spot was up cost, normalized: each at
    the on-demand premium over spot (had it been a spot hour)."""
    extra = (ours.od_spot_up - best.od_spot_up) * (job.on_demand_price - job.spot_price)
    return extra / on_demand_only_cost(job)


def _cells(h: Hours) -> list[str]:
    return [f"{h.cost:.3f}"] + [f"{getattr(h, k):.1f}" for k in COLUMNS if k != "cost"]


def _header(first: list[str]) -> list[str]:
    names = first + [f"{v} (spotctl / optimum)" for v in COLUMNS.values()]
    return ["| " + " | ".join(names) + " |", "|" + " --- |" * len(names)]


def _row(first: list[str], ours: Hours, best: Hours) -> str:
    pairs = [f"{a} / {b}" for a, b in zip(_cells(ours), _cells(best), strict=True)]
    return "| " + " | ".join(first + pairs) + " |"


GROUPS = {"a": "32 single-AZ scenarios (aws-10-26-2022)", "v": "36 held out (aws-02-15-2023)"}


def report(results: dict[Scenario, tuple[Hours, Hours]], starts: int, seconds: float) -> str:
    """docs/gap.md: group means by deadline and overhead, then every scenario."""
    lines = [
        "# Where the cost goes: spotctl beside the offline optimum",
        "",
        "Generated by `bench/gap.py` (do not edit by hand). Mean hours per run, spotctl / "
        f"the offline optimum, {starts} start offsets per scenario; the job is 48 h of work, "
        "spot $0.97/h, on-demand $3.06/h, cost normalized to on-demand alone. Columns: see "
        "the module docstring of `bench/gap.py`.",
        "",
    ]
    for group, label in GROUPS.items():
        mine = {sc: r for sc, r in results.items() if sc.group == group}
        if mine:
            ours, best = mean([o for o, _ in mine.values()]), mean([b for _, b in mine.values()])
            premium = statistics.fmean(premium_cost(o, b, sc.job) for sc, (o, b) in mine.items())
            lines.append(
                f"- {label}: cost {ours.cost:.3f} against the optimum's {best.cost:.3f}; "
                f"{ours.od_spot_up - best.od_spot_up:.1f} h more on-demand while spot was up "
                f"cost {premium:.3f} of it at the on-demand premium over spot "
                f"({premium / (ours.cost - best.cost):.0%} of the difference)."
            )
    lines += ["", "## By group, deadline and restart overhead", ""]
    lines += _header(["scenarios", "deadline h", "overhead h"])
    for group, label in GROUPS.items():
        cells = {sc: r for sc, r in results.items() if sc.group == group}
        for dl in (52.0, 70.0):
            for oh in (0.05, 0.2):
                cell = [
                    r
                    for sc, r in cells.items()
                    if (sc.job.deadline_hours, sc.job.restart_overhead_hours) == (dl, oh)
                ]
                if cell:
                    ours, best = mean([o for o, _ in cell]), mean([b for _, b in cell])
                    lines.append(_row([label, f"{dl:g}", f"{oh:g}"], ours, best))
    lines += ["", "## Every scenario", "", *_header(["group", "trace", "deadline h", "overhead h"])]
    for sc, (ours, best) in results.items():
        first = [sc.group, Path(sc.files[0]).stem]
        first += [f"{sc.job.deadline_hours:g}", f"{sc.job.restart_overhead_hours:g}"]
        lines.append(_row(first, ours, best))
    lines += ["", f"{len(results)} scenarios in {seconds:.0f} s.", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--trace", type=Path, help="one trace JSON (default: all scenarios)")
    parser.add_argument("--deadline-hours", type=float, default=52.0)
    parser.add_argument("--restart-overhead-hours", type=float, default=0.2)
    parser.add_argument("--starts", type=int, default=25)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "gap.md")
    args = parser.parse_args(argv)
    began = time.monotonic()
    if args.trace:
        job = JobSpec(
            deadline_hours=args.deadline_hours, restart_overhead_hours=args.restart_overhead_hours
        )
        scenarios = [Scenario("cli", (str(args.trace.resolve()),), job, args.starts)]
    else:
        scenarios = [
            sc for sc in default_scenarios(args.starts, held_out=True) if sc.group in GROUPS
        ]
    results = evaluate(scenarios, args.workers)
    text = report(results, args.starts, time.monotonic() - began)
    if args.trace:
        print(text)
    else:
        args.out.write_text(text)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
