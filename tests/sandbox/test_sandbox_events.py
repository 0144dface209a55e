"""Events: documented shapes, pattern routing, delivery semantics, Chalice handlers, observers."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chalice.app import Chalice, Rate

from spotctl.sandbox import (
    EventBus,
    LifecycleEvent,
    LocalCloud,
    ScaledClock,
    SpotPool,
    load_trace,
    schedules_from_chalice_app,
    targets_from_chalice_app,
)

from .conftest import launch, volume_in, write_trace

SHAPES = Path(__file__).resolve().parents[1] / "fixtures" / "aws-events"  # the documented shapes


def event(detail_type: str, state: str | None = None, instance_id: str = "i-1") -> dict[str, Any]:
    detail = {"instance-id": instance_id} | ({"state": state} if state else {})
    return {"version": "0", "id": instance_id + (state or ""), "detail-type": detail_type,
            "source": "aws.ec2", "detail": detail}  # fmt: skip


def test_emitted_events_have_the_documented_shapes(cloud: LocalCloud, ec2: Any) -> None:
    events: list[dict[str, Any]] = []
    cloud.add_target({"source": ["aws.ec2"]}, events.append)
    launch(ec2)
    cloud.advance(720)
    by_kind = {(e["detail-type"], e["detail"].get("state")): e for e in events}
    documented = {
        "state-change-running.json": ("EC2 Instance State-change Notification", "running"),
        "state-change-terminated.json": ("EC2 Instance State-change Notification", "terminated"),
        "spot-interruption-warning.json": ("EC2 Spot Instance Interruption Warning", None),
    }
    for name, kind in documented.items():
        ours = by_kind[kind]
        if (SHAPES / name).exists():
            theirs = json.loads((SHAPES / name).read_text())
            assert set(ours) == set(theirs)
            assert set(ours["detail"]) == set(theirs["detail"])
        assert ours["version"] == "0" and ours["source"] == "aws.ec2"
        assert ours["resources"] == [
            f"arn:aws:ec2:us-east-1:123456789012:instance/{ours['detail']['instance-id']}"
        ]


def test_bus_delivers_only_to_targets_whose_pattern_matches() -> None:
    running: list[str] = []
    warnings: list[str] = []
    bus = EventBus.of(
        [
            ({"detail-type": ["EC2 Instance State-change Notification"],
              "detail": {"state": ["running"]}}, lambda e: running.append(e["id"])),
            ({"detail-type": ["EC2 Spot Instance Interruption Warning"]},
             lambda e: warnings.append(e["id"])),
        ]
    )  # fmt: skip
    bus.put(event("EC2 Instance State-change Notification", "running"))
    bus.put(event("EC2 Instance State-change Notification", "stopped"))
    bus.put(event("EC2 Instance Rebalance Recommendation"))
    bus.deliver_pending()
    assert running == ["i-1running"]
    assert warnings == []


def test_bus_with_duplicates_and_reordering_still_delivers_each_event_at_least_once() -> None:
    seen: list[str] = []
    bus = EventBus.of(
        [({"source": ["aws.ec2"]}, lambda e: seen.append(e["id"]))],
        seed=7,
        duplicate_probability=0.5,
        reorder_window=4,
    )
    ids = [f"i-{n}" for n in range(20)]
    for instance_id in ids:
        bus.put(event("EC2 Instance State-change Notification", None, instance_id))
    bus.deliver_pending()
    assert set(seen) == set(ids)
    assert len(seen) > len(ids)  # some duplicates
    assert seen[: len(ids)] != ids  # not in the order sent


def test_failing_handler_is_retried_then_recorded() -> None:
    calls: list[int] = []

    def flaky(event: dict[str, Any]) -> None:
        calls.append(1)
        raise RuntimeError("lambda crashed")

    bus = EventBus.of([({"source": ["aws.ec2"]}, flaky)], max_attempts=3)
    bus.put(event("EC2 Instance State-change Notification", "running"))
    bus.deliver_pending()
    assert len(calls) == 3
    assert len(bus.failures) == 1


def tiny_app(received: list[tuple[str, str]]) -> Chalice:
    app = Chalice(app_name="tiny")

    @app.on_cw_event(
        {"source": ["aws.ec2"], "detail-type": ["EC2 Spot Instance Interruption Warning"]}
    )
    def on_warning(event: Any) -> None:
        received.append(("warning", event.detail["instance-id"]))

    @app.on_cw_event(
        {"source": ["aws.ec2"], "detail-type": ["EC2 Instance State-change Notification"],
         "detail": {"state": ["terminated"]}}
    )  # fmt: skip
    def on_terminated(event: Any) -> None:
        received.append(("terminated", event.detail["instance-id"]))

    @app.schedule(Rate(1, unit=Rate.MINUTES))
    def sweep(event: Any) -> None:
        received.append(("sweep", event.time))

    return app


def test_chalice_handlers_receive_events_their_registered_patterns_match(
    make_cloud: Callable[..., LocalCloud], pool_trace: Path
) -> None:
    received: list[tuple[str, str]] = []
    app = tiny_app(received)
    targets = targets_from_chalice_app(app)
    assert sorted(t.name for t in targets) == ["on_terminated", "on_warning"]
    pool = SpotPool("p3.2xlarge", "us-east-1a", load_trace(pool_trace))
    cloud = make_cloud(pools=[pool], bus=EventBus(targets=targets))
    instance_id = launch(cloud.client("ec2"))
    cloud.advance(600)
    assert received == [("warning", instance_id)]
    cloud.advance(120)
    assert received == [("warning", instance_id), ("terminated", instance_id)]


def test_schedule_handlers_fire_every_period_of_sandbox_time(
    make_cloud: Callable[..., LocalCloud],
) -> None:
    received: list[tuple[str, str]] = []
    schedules = schedules_from_chalice_app(tiny_app(received))
    assert [(s.name, s.every_seconds) for s in schedules] == [("sweep", 60.0)]
    cloud = make_cloud(schedules=schedules)
    cloud.advance(59)
    assert received == []
    cloud.advance(121)
    assert received == [
        ("sweep", "2026-11-28T12:01:00Z"),
        ("sweep", "2026-11-28T12:02:00Z"),
        ("sweep", "2026-11-28T12:03:00Z"),
    ]


def test_observer_sees_launch_attach_and_termination_with_user_data(
    cloud: LocalCloud, ec2: Any
) -> None:
    seen: list[LifecycleEvent] = []
    cloud.add_observer(seen.append)
    instance_id = launch(ec2, spot=False, UserData="#!/bin/bash\necho agent\n")
    data = volume_in(ec2)
    ec2.attach_volume(VolumeId=data, InstanceId=instance_id, Device="/dev/sdf")
    ec2.terminate_instances(InstanceIds=[instance_id])
    cloud.advance(30)
    kinds = [(n.kind.value, n.volume_id) for n in seen]
    assert kinds == [
        ("running", None),
        ("volume-attached", data),
        ("terminated", None),
        ("volume-detached", data),
    ]
    running = seen[0].instance
    assert (running.instance_id, running.az, running.market) == (
        instance_id,
        "us-east-1a",
        "on-demand",
    )
    assert running.user_data == "#!/bin/bash\necho agent\n"
    assert seen[2].instance.volumes == {data: "/dev/sdf"}


def test_scaled_clock_runs_interruptions_in_the_background(tmp_path: Path) -> None:
    trace = write_trace(tmp_path, "us-east-1a_v100_1.json", 60, [0, 0, 1])
    pool = SpotPool("p3.2xlarge", "us-east-1a", load_trace(trace))
    warned: list[str] = []
    # 60x: capacity goes 2 real seconds after start; the 30 s notice lasts 0.5 real seconds.
    clock = ScaledClock(60.0)
    with LocalCloud(clock=clock, pools=[pool], notice_seconds=30, poll_interval=0.01) as cloud:
        cloud.add_target({"detail-type": [{"suffix": "Interruption Warning"}]},
                         lambda e: warned.append(e["detail"]["instance-id"]))  # fmt: skip
        instance_id = launch(cloud.client("ec2"))
        deadline = time.monotonic() + 10
        while cloud.ec2.instance_state(instance_id) != "terminated" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert cloud.ec2.instance_state(instance_id) == "terminated"
        assert warned == [instance_id]
