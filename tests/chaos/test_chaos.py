"""The chaos bench at CI size: a dozen jobs on recorded traces through every fault at
once (duplicated, reordered and lost events, Lambdas killed mid-pass, throttling,
capacity errors, slow detaches, workloads that crash once). bench/chaos.py runs the
same with 200 jobs.
"""

from __future__ import annotations

from bench.chaos import ChaosConfig, render, run


def test_chaos_keeps_every_invariant_for_a_dozen_jobs() -> None:
    config = ChaosConfig(
        jobs=12,
        seed=7,
        work_hours=0.75,
        checkpoint_steps=10,
        arrival_hours=0.1,
        horizon_hours=1.25,
        drain_hours=1.25,
        sweep_seconds=300.0,
        crash_probability=0.2,  # more crashes per job than the bench: fewer jobs to hit
        error_fraction=0.25,  # likewise for workloads that crash once
    )
    report = run(config)
    print(render(report))
    assert report.ok, render(report)
    assert set(report.states) <= {"SUCCEEDED", "CANCELLED"}, report.states
    # The faults did happen: a run that injected nothing proves nothing.
    assert report.interruptions > 0
    assert report.workload_crashes > 0
    assert report.faults.get("throttled-requests", 0) > 0
    assert sum(v for k, v in report.faults.items() if k.startswith("crashes:")) > 0
