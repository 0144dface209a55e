"""``decide`` as a table: one row per situation, no AWS, no clock but the argument."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from chalicelib import models
from chalicelib.ec2 import InstanceView, SnapshotView, VolumeView
from chalicelib.models import (
    Attempt,
    Candidate,
    Job,
    JobSpec,
    JobState,
    Pool,
    Volume,
    VolumeMove,
)
from chalicelib.reconcile import (
    CANCEL_VOLUME_WAIT_SECONDS,
    AttachVolume,
    CreateSnapshot,
    CreateVolume,
    DeleteVolume,
    Launch,
    Observed,
    Terminate,
    decide,
    note_warning,
)

NOW = 1_800_000_000.0
AZ = "us-east-1a"
POOL = Pool(instance_type="g4dn.xlarge", az=AZ)
OTHER_TYPE = Pool(instance_type="g5.xlarge", az=AZ)
OTHER_ZONE = Pool(instance_type="g4dn.xlarge", az="us-east-1b")
PRICES = {POOL: 0.20, OTHER_TYPE: 0.45, OTHER_ZONE: 0.15}
HOME_PRICES = {POOL: 0.20, OTHER_TYPE: 0.45}  # spot offered in the volume's zone only
VOLUME = Volume(volume_id="vol-0123456789abcdef0", az=AZ, created_by_spotctl=True)


def spec(**overrides: Any) -> JobSpec:
    fields: dict[str, Any] = {
        "name": "train",
        "command": ["python", "train.py"],
        "instance_types": ["g4dn.xlarge", "g5.xlarge"],
        "volume_gib": 50,
        **overrides,
    }
    return JobSpec.model_validate(fields)


def attempt(number: int, instance: str | None, **overrides: Any) -> Attempt:
    candidate = Candidate(
        pool=POOL, market="spot", max_price=0.526, expected_price=0.2, client_token=f"t-{number}"
    )
    fields: dict[str, Any] = {
        "number": number,
        "reason": "test",
        "candidates": (candidate,),
        "requested_at": NOW - 3600,
        "instance_id": instance,
        "pool": POOL if instance else None,
        "market": "spot" if instance else None,
        "price": 0.2 if instance else None,
        **overrides,
    }
    return Attempt(**fields)


def job(state: JobState, attempts: tuple[Attempt, ...] = (), **overrides: Any) -> Job:
    fields: dict[str, Any] = {
        "job_id": "j-0000000000000001",
        "spec": spec(),
        "state": state,
        "created_at": NOW - 7200,
        "updated_at": NOW - 7200,
        "secret_hash": "x",
        "attempts": attempts,
        "volume": VOLUME if attempts else None,
        **overrides,
    }
    return Job(**fields)


def instances(**states: str) -> dict[str, InstanceView]:
    return {iid: InstanceView(iid, state, AZ) for iid, state in states.items()}  # type: ignore[arg-type]


def volume(state: str = "in-use", attached_to: str | None = "i-1", az: str = AZ) -> VolumeView:
    return VolumeView(
        VOLUME.volume_id, state, az, 50, attached_to, "attached" if attached_to else None
    )


RUNNING_1 = job(JobState.RUNNING, (attempt(1, "i-1", running_at=NOW - 3000),))


def deleting(**update: object) -> Job:
    """RUNNING_1, cancelled with delete_volume, its results in S3."""
    base = {
        "cancel_requested_at": NOW,
        "delete_volume_on_cancel": True,
        "results_uri": "s3://bucket/jobs/j",
    }
    return RUNNING_1.model_copy(update={**base, **update})


WARNED_1 = job(JobState.RUNNING, (attempt(1, "i-1", running_at=NOW - 3000, warned_at=NOW),))
# The workload exited 2; the spec allows one restart on errors.
FAILED_1 = RUNNING_1.model_copy(
    update={"spec": spec(max_restarts_on_errors=1), "exit_code": 2, "exit_attempt": 1}
)
RECOVERING = job(
    JobState.RECOVERING,
    (
        attempt(1, "i-1", running_at=NOW - 3000, warned_at=NOW - 60),
        attempt(2, "i-2", requested_at=NOW - 60),
    ),
)


@dataclass
class Row:
    name: str
    job: Job
    observed: Observed
    state: JobState
    actions: list[type] = field(default_factory=list)
    needs_prices: bool = False
    attempts: int | None = None


ROWS = [
    Row(
        "submitted without prices asks for them",
        job(JobState.SUBMITTED),
        Observed({}, None),
        JobState.SUBMITTED,
        needs_prices=True,
    ),
    Row(
        "submitted with prices creates the volume and writes the launch ahead",
        job(JobState.SUBMITTED),
        Observed({}, None, PRICES),
        JobState.PROVISIONING,
        [CreateVolume, Launch],
        attempts=1,
    ),
    Row(
        "written-ahead attempt without an instance is launched again (same tokens)",
        job(JobState.PROVISIONING, (attempt(1, None),), volume=None),
        Observed({}, None),
        JobState.PROVISIONING,
        [CreateVolume, Launch],
        attempts=1,
    ),
    Row(
        "pending instance: wait",
        job(JobState.PROVISIONING, (attempt(1, "i-1"),)),
        Observed(instances(**{"i-1": "pending"}), volume("available", None)),
        JobState.PROVISIONING,
    ),
    Row(
        "running instance and available volume: attach",
        job(JobState.PROVISIONING, (attempt(1, "i-1"),)),
        Observed(instances(**{"i-1": "running"}), volume("available", None)),
        JobState.PROVISIONING,
        [AttachVolume],
    ),
    Row(
        "volume still creating: wait",
        job(JobState.PROVISIONING, (attempt(1, "i-1"),)),
        Observed(instances(**{"i-1": "running"}), volume("creating", None)),
        JobState.PROVISIONING,
    ),
    Row(
        "attached and running: nothing to do",
        RUNNING_1,
        Observed(instances(**{"i-1": "running"}), volume()),
        JobState.RUNNING,
    ),
    Row(
        "volume attached but state not yet RUNNING: becomes RUNNING",
        job(JobState.RECOVERING, (attempt(1, "i-1", running_at=NOW),)),
        Observed(instances(**{"i-1": "running"}), volume()),
        JobState.RUNNING,
    ),
    Row(
        "warned: replacement written ahead while the old one still runs",
        WARNED_1,
        Observed(instances(**{"i-1": "running"}), volume(), PRICES),
        JobState.INTERRUPTED,
        [Launch],
        attempts=2,
    ),
    Row(
        "warned without prices asks for them",
        WARNED_1,
        Observed(instances(**{"i-1": "running"}), volume()),
        JobState.RUNNING,
        needs_prices=True,
    ),
    Row(
        "vanished without warning: replacement",
        RUNNING_1,
        Observed(instances(**{"i-1": "terminated"}), volume("available", None), HOME_PRICES),
        JobState.RECOVERING,
        [Launch],
        attempts=2,
    ),
    Row(
        "instance missing from EC2 altogether: replacement",
        RUNNING_1,
        Observed(instances(**{"i-1": "missing"}), volume("available", None), HOME_PRICES),
        JobState.RECOVERING,
        [Launch],
        attempts=2,
    ),
    Row(
        "stopped instance is terminated and replaced",
        RUNNING_1,
        Observed(instances(**{"i-1": "stopped"}), volume(), PRICES),
        JobState.RECOVERING,
        [Launch, Terminate],
        attempts=2,
    ),
    Row(
        "replacement running but the volume is still on the old instance: wait",
        RECOVERING,
        Observed(instances(**{"i-1": "running", "i-2": "running"}), volume()),
        JobState.RECOVERING,
    ),
    Row(
        "old instance gone, volume free: attach to the replacement",
        RECOVERING,
        Observed(instances(**{"i-1": "terminated", "i-2": "running"}), volume("available", None)),
        JobState.RECOVERING,
        [AttachVolume],
    ),
    Row(
        "volume detaching: wait",
        RECOVERING,
        Observed(
            instances(**{"i-1": "terminated", "i-2": "running"}),
            VolumeView(VOLUME.volume_id, "in-use", AZ, 50, "i-1", "detaching"),
        ),
        JobState.RECOVERING,
    ),
    Row(
        "warned instance outliving its notice by minutes is terminated",
        job(
            JobState.RECOVERING,
            (
                attempt(1, "i-1", running_at=NOW - 3000, warned_at=NOW - 600),
                attempt(2, "i-2"),
            ),
        ),
        Observed(instances(**{"i-1": "running", "i-2": "running"}), volume()),
        JobState.RECOVERING,
        [Terminate],
    ),
    Row(
        "replacement in another zone is never attached; it is ended and replaced",
        job(
            JobState.RECOVERING,
            (
                attempt(1, "i-1", ended_at=NOW - 60, end_reason="interrupted"),
                attempt(2, "i-2"),
            ),
        ),
        Observed(
            {"i-2": InstanceView("i-2", "running", "us-east-1b")},
            volume("available", None),
            PRICES,
        ),
        JobState.RECOVERING,
        [Launch, Terminate],
        attempts=3,
    ),
    Row(
        "no affordable pool: wait",
        job(JobState.SUBMITTED, spec=spec(max_price_per_hour=0.01)),
        Observed({}, None, PRICES),
        JobState.WAITING,
    ),
    Row(
        "waiting before its time: nothing",
        job(JobState.WAITING, wait_until=NOW + 60),
        Observed({}, None),
        JobState.WAITING,
    ),
    Row(
        "waiting after its time asks for prices again",
        job(JobState.WAITING, wait_until=NOW - 1),
        Observed({}, None),
        JobState.WAITING,
        needs_prices=True,
    ),
    Row(
        "exit 0 reported: succeeded, instance terminated",
        RUNNING_1.model_copy(update={"exit_code": 0, "exit_attempt": 1}),
        Observed(instances(**{"i-1": "running"}), volume()),
        JobState.SUCCEEDED,
        [Terminate],
    ),
    Row(
        "exit 2 reported: failed",
        RUNNING_1.model_copy(update={"exit_code": 2, "exit_attempt": 1}),
        Observed(instances(**{"i-1": "running"}), volume()),
        JobState.FAILED,
        [Terminate],
    ),
    Row(
        "exit 2 with a restart left, instance still up: terminate it, launch nothing yet",
        FAILED_1,
        Observed(instances(**{"i-1": "running"}), volume(), HOME_PRICES),
        JobState.RUNNING,
        [Terminate],
        attempts=1,
    ),
    Row(
        "exit 2 with a restart left, instance gone: started again, like a relaunch",
        FAILED_1,
        Observed(instances(**{"i-1": "terminated"}), volume("available", None), HOME_PRICES),
        JobState.RECOVERING,
        [Launch],
        attempts=2,
    ),
    Row(
        "exit 2 with its restarts used up: failed",
        FAILED_1.model_copy(update={"error_restarts": 1}),
        Observed(instances(**{"i-1": "running"}), volume()),
        JobState.FAILED,
        [Terminate],
    ),
    Row(
        "exit 2 listed in recover_on_exit_codes, no restarts on errors: started again",
        FAILED_1.model_copy(update={"spec": spec(recover_on_exit_codes=(2,))}),
        Observed(instances(**{"i-1": "terminated"}), volume("available", None), HOME_PRICES),
        JobState.RECOVERING,
        [Launch],
        attempts=2,
    ),
    Row(
        "exit 2 listed, after as many listed restarts as are allowed: failed",
        FAILED_1.model_copy(
            update={
                "spec": spec(recover_on_exit_codes=(2,)),
                "exit_code_restarts": models.MAX_EXIT_CODE_RESTARTS,
            }
        ),
        Observed(instances(**{"i-1": "running"}), volume()),
        JobState.FAILED,
        [Terminate],
    ),
    Row(
        "exit 2 not listed (3 is), no restarts on errors: failed",
        FAILED_1.model_copy(update={"spec": spec(recover_on_exit_codes=(3,))}),
        Observed(instances(**{"i-1": "running"}), volume()),
        JobState.FAILED,
        [Terminate],
    ),
    Row(
        "cancel while running: terminate, CANCELLING",
        RUNNING_1.model_copy(update={"cancel_requested_at": NOW}),
        Observed(instances(**{"i-1": "running"}), volume()),
        JobState.CANCELLING,
        [Terminate],
    ),
    Row(
        "cancel while recovering terminates both instances",
        RECOVERING.model_copy(update={"cancel_requested_at": NOW}),
        Observed(instances(**{"i-1": "running", "i-2": "pending"}), volume()),
        JobState.CANCELLING,
        [Terminate],
    ),
    Row(
        "cancelling and every instance gone: CANCELLED, volume kept",
        RUNNING_1.model_copy(update={"cancel_requested_at": NOW, "state": JobState.CANCELLING}),
        Observed(instances(**{"i-1": "terminated"}), volume("available", None)),
        JobState.CANCELLED,
    ),
    Row(
        "cancelled with delete_volume, the last instance's final sync reported: deleted",
        deleting(final_sync_attempt=1),
        Observed(instances(**{"i-1": "terminated"}), volume("available", None)),
        JobState.CANCELLED,
        [DeleteVolume],
    ),
    Row(
        "cancelled with delete_volume, synced, volume still attached: wait for it",
        deleting(final_sync_attempt=1),
        Observed(instances(**{"i-1": "terminated"}), volume("in-use", "i-1")),
        JobState.CANCELLING,
    ),
    Row(
        "cancelled with delete_volume, only a periodic sync: wait for the final one",
        deleting(data_synced_at=NOW - 10),
        Observed(instances(**{"i-1": "terminated"}), volume("available", None)),
        JobState.CANCELLING,
    ),
    Row(
        "cancelled with delete_volume, no final sync within the wait: volume kept",
        deleting(cancel_requested_at=NOW - CANCEL_VOLUME_WAIT_SECONDS, data_synced_at=NOW - 10),
        Observed(instances(**{"i-1": "terminated"}), volume("available", None)),
        JobState.CANCELLED,
    ),
    Row(
        "cancelled with delete_volume, a volume EC2 does not show yet: wait, not gone",
        deleting(final_sync_attempt=1, volume=VOLUME.model_copy(update={"created_at": NOW - 10})),
        Observed(instances(**{"i-1": "terminated"}), VolumeView(VOLUME.volume_id, "missing")),
        JobState.CANCELLING,
    ),
    Row(
        "cancelled with delete_volume, no S3 copy at all: volume kept at once",
        RUNNING_1.model_copy(
            update={
                "cancel_requested_at": NOW,
                "delete_volume_on_cancel": True,
                "final_sync_attempt": 1,
            }
        ),
        Observed(instances(**{"i-1": "terminated"}), volume("available", None)),
        JobState.CANCELLED,
    ),
    Row(
        "terminal job with a straggler instance: terminate it, state unchanged",
        RUNNING_1.model_copy(update={"state": JobState.SUCCEEDED}),
        Observed(instances(**{"i-1": "running"}), None),
        JobState.SUCCEEDED,
        [Terminate],
    ),
    Row(
        "existing volume that does not exist: FAILED",
        job(JobState.SUBMITTED, spec=spec(volume_gib=None, volume_id="vol-0123456789abcdef1")),
        Observed({}, VolumeView("vol-0123456789abcdef1", "missing")),
        JobState.FAILED,
    ),
    Row(
        "volume lost with an S3 copy: new volume, new attempt",
        RUNNING_1.model_copy(update={"spec": spec(results_s3_uri="s3://bucket/run")}),
        Observed(instances(**{"i-1": "running"}), VolumeView(VOLUME.volume_id, "missing"), PRICES),
        JobState.RECOVERING,
        [CreateVolume, Launch, Terminate],
        attempts=2,
    ),
    Row(
        "volume lost without an S3 copy: FAILED",
        RUNNING_1,
        Observed(instances(**{"i-1": "running"}), VolumeView(VOLUME.volume_id, "missing")),
        JobState.FAILED,
        [Terminate],
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_decide(row: Row) -> None:
    decision = decide(row.job, row.observed, NOW)
    assert decision.job.state == row.state
    assert [type(a) for a in decision.actions] == row.actions
    assert decision.needs_prices == row.needs_prices
    if row.attempts is not None:
        assert len(decision.job.attempts) == row.attempts
    assert decision.job.version == row.job.version  # decide never bumps the version


def test_decide_is_idempotent_once_its_record_is_written() -> None:
    first = decide(WARNED_1, Observed(instances(**{"i-1": "running"}), volume(), PRICES), NOW)
    launched = first.job.replace_attempt(
        first.job.attempts[1].model_copy(update={"instance_id": "i-2"})
    )
    again = decide(
        launched, Observed(instances(**{"i-1": "running", "i-2": "pending"}), volume()), NOW
    )
    assert again.actions == ()
    assert len(again.job.attempts) == 2


def test_a_failed_workload_is_started_again_from_its_volume_and_told_once() -> None:
    gone = Observed(instances(**{"i-1": "terminated"}), volume("available", None), HOME_PRICES)
    after = decide(FAILED_1, gone, NOW).job
    first, second = after.attempts
    assert first.end_reason == "failed"
    assert second.instance_id is None and second.ended_at is None  # written ahead
    assert second.candidates[0].pool.az == VOLUME.az  # the volume, and its checkpoint
    assert (after.exit_code, after.exit_attempt, after.error_restarts) == (None, None, 1)
    kinds = [e.kind for e in after.timeline][-3:]
    assert kinds == ["instance-failed", "restarting-after-error", "launch-requested"]
    assert after.timeline[-2].detail == "exit code 2; restart 1 of 1"
    # The second failure ends the job, saying how many restarts it had.
    failed_again = after.model_copy(update={"exit_code": 2, "exit_attempt": 2})
    running = Observed(instances(**{"i-2": "running"}), volume())
    final = decide(failed_again, running, NOW).job
    assert final.state is JobState.FAILED
    assert final.failure == "the workload exited with code 2, after 1 restart(s) on errors"


def test_replacement_goes_to_the_volume_zone_even_when_another_zone_is_cheaper() -> None:
    decision = decide(WARNED_1, Observed(instances(**{"i-1": "running"}), volume(), PRICES), NOW)
    replacement = decision.job.attempts[-1]
    assert {c.pool.az for c in replacement.candidates} == {AZ}
    assert [c.pool for c in replacement.candidates] == [POOL, OTHER_TYPE]


def test_first_launch_picks_the_cheapest_zone_and_creates_the_volume_there() -> None:
    decision = decide(job(JobState.SUBMITTED), Observed({}, None, PRICES), NOW)
    create = decision.actions[0]
    assert isinstance(create, CreateVolume)
    assert create.az == "us-east-1b"
    assert decision.job.attempts[0].candidates[0].pool == OTHER_ZONE


def test_client_tokens_are_per_job_attempt_and_candidate() -> None:
    decision = decide(WARNED_1, Observed(instances(**{"i-1": "running"}), volume(), PRICES), NOW)
    tokens = [c.client_token for c in decision.job.attempts[-1].candidates]
    assert tokens == ["j-0000000000000001-2-0", "j-0000000000000001-2-1"]
    assert all(len(t) <= 64 for t in tokens)


def test_max_price_defaults_to_on_demand_and_follows_the_cap() -> None:
    default = decide(job(JobState.SUBMITTED), Observed({}, None, PRICES), NOW)
    assert default.job.attempts[0].candidates[0].max_price == 0.526
    capped_spec = spec(max_price_per_hour=0.3)
    capped = decide(job(JobState.SUBMITTED, spec=capped_spec), Observed({}, None, PRICES), NOW)
    assert [c.max_price for c in capped.job.attempts[0].candidates] == [0.3]


def test_a_duplicate_warning_is_noted_once() -> None:
    noted = note_warning("i-1")(RUNNING_1, NOW)
    again = note_warning("i-1")(noted, NOW + 5)
    assert again == noted
    assert noted.attempts[0].warned_at == NOW


def test_without_observation_a_warning_goes_straight_to_the_replacement() -> None:
    asks = decide(WARNED_1, Observed(), NOW)
    assert asks.needs_prices and not asks.needs_observation
    decision = decide(WARNED_1, Observed(prices=PRICES), NOW)
    assert [type(a) for a in decision.actions] == [Launch]
    assert decision.job.state == JobState.INTERRUPTED


@pytest.mark.parametrize(
    "situation",
    [
        RUNNING_1,
        RECOVERING,
        WARNED_1.model_copy(update={"cancel_requested_at": NOW}),
        WARNED_1.model_copy(update={"exit_code": 0}),
    ],
    ids=["running", "recovering", "warned-but-cancelled", "warned-but-exited"],
)
def test_without_observation_anything_else_asks_to_observe(situation: Job) -> None:
    decision = decide(situation, Observed(), NOW)
    assert decision.needs_observation
    assert decision.actions == ()
    assert decision.job == situation


# -- moving the volume to another zone ----------------------------------------------

ELSEWHERE = "us-east-1b"
RECLAIMED_1 = job(
    JobState.RECOVERING,
    (attempt(1, "i-1", running_at=NOW - 3000, ended_at=NOW - 60, end_reason="reclaimed"),),
)
MOVE = VolumeMove(
    number=1,
    from_volume_id=VOLUME.volume_id,
    from_az=AZ,
    to_az=ELSEWHERE,
    reason=f"move from zone {AZ} to zone {ELSEWHERE}: spot in g4dn.xlarge@{ELSEWHERE}",
    requested_at=NOW - 120,
    snapshot_requested=True,
)
SNAPSHOT = "snap-0123456789abcdef0"
NEW_VOLUME = "vol-0fedcba9876543210"


def moving(**step: Any) -> Job:
    return RECLAIMED_1.model_copy(update={"move": MOVE.model_copy(update=step), "moves": 1})


def restored(state: str) -> VolumeView:
    return VolumeView(NEW_VOLUME, state, ELSEWHERE, 50)


FREE = volume("available", None)


@dataclass
class MoveRow:
    name: str
    job: Job
    observed: Observed
    actions: list[type]
    move: VolumeMove | None  # the record's move after the decision
    volume_az: str = AZ  # the job's volume's zone after the decision
    launch_az: str | None = None  # the new attempt's zone, if one is planned


MOVE_ROWS = [
    MoveRow(
        "cheaper zone, volume free, no instance alive: snapshot written ahead",
        RECLAIMED_1,
        Observed({}, FREE, PRICES),
        [CreateSnapshot],
        MOVE.model_copy(update={"requested_at": NOW, "reason": ""}),
    ),
    MoveRow(
        "cheaper zone but the volume is still attached: no move, launch at home",
        RUNNING_1,
        Observed(instances(**{"i-1": "stopped"}), volume(), PRICES),
        [Launch, Terminate],
        None,
        launch_az=AZ,
    ),
    MoveRow(
        "a volume the user brought never moves",
        RECLAIMED_1.model_copy(
            update={"volume": VOLUME.model_copy(update={"created_by_spotctl": False})}
        ),
        Observed({}, FREE, PRICES),
        [Launch],
        None,
        launch_az=AZ,
    ),
    MoveRow(
        "move planned but the old volume still in use: wait, no snapshot",
        moving(snapshot_requested=False),
        Observed({}, volume("in-use", "i-1"), PRICES),
        [],
        MOVE.model_copy(update={"snapshot_requested": False}),
    ),
    MoveRow(
        "move planned but the old volume stays busy past the limit: give up, stay home",
        moving(snapshot_requested=False, requested_at=NOW - 700),
        Observed({}, volume("in-use", "i-1"), PRICES),
        [Launch],
        None,
        launch_az=AZ,
    ),
    MoveRow(
        "snapshot written ahead but not recorded: replay finds it by tag",
        moving(),
        Observed({}, FREE, PRICES),
        [CreateSnapshot],
        MOVE,
    ),
    MoveRow(
        "snapshot pending: wait",
        moving(snapshot_id=SNAPSHOT),
        Observed({}, FREE, PRICES, snapshot=SnapshotView(SNAPSHOT, "pending")),
        [],
        MOVE.model_copy(update={"snapshot_id": SNAPSHOT}),
    ),
    MoveRow(
        "snapshot completed: restore it in the target zone",
        moving(snapshot_id=SNAPSHOT),
        Observed({}, FREE, PRICES, snapshot=SnapshotView(SNAPSHOT, "completed")),
        [CreateVolume],
        MOVE.model_copy(update={"snapshot_id": SNAPSHOT}),
    ),
    MoveRow(
        "restored volume still creating: wait",
        moving(snapshot_id=SNAPSHOT, volume_id=NEW_VOLUME),
        Observed(
            {},
            FREE,
            PRICES,
            snapshot=SnapshotView(SNAPSHOT, "completed"),
            moved_volume=restored("creating"),
        ),
        [],
        MOVE.model_copy(update={"snapshot_id": SNAPSHOT, "volume_id": NEW_VOLUME}),
    ),
    MoveRow(
        "restored volume available: it becomes the job's, launch in the target zone",
        moving(snapshot_id=SNAPSHOT, volume_id=NEW_VOLUME),
        Observed(
            {},
            FREE,
            PRICES,
            snapshot=SnapshotView(SNAPSHOT, "completed"),
            moved_volume=restored("available"),
        ),
        [Launch],
        None,
        volume_az=ELSEWHERE,
        launch_az=ELSEWHERE,
    ),
    MoveRow(
        "snapshot failed: fall back to the volume's zone",
        moving(snapshot_id=SNAPSHOT),
        Observed({}, FREE, PRICES, snapshot=SnapshotView(SNAPSHOT, "error")),
        [Launch],
        None,
        launch_az=AZ,
    ),
    MoveRow(
        "restored volume failed: fall back to the volume's zone",
        moving(snapshot_id=SNAPSHOT, volume_id=NEW_VOLUME),
        Observed(
            {},
            FREE,
            PRICES,
            snapshot=SnapshotView(SNAPSHOT, "completed"),
            moved_volume=restored("error"),
        ),
        [Launch],
        None,
        launch_az=AZ,
    ),
]


@pytest.mark.parametrize("row", MOVE_ROWS, ids=[row.name for row in MOVE_ROWS])
def test_decide_moves(row: MoveRow) -> None:
    decision = decide(row.job, row.observed, NOW)
    assert [type(a) for a in decision.actions] == row.actions
    move = decision.job.move
    if row.move is None:
        assert move is None
    else:
        assert move is not None
        ignore = {"reason"} if not row.move.reason else set()
        assert move.model_dump(exclude=ignore) == row.move.model_dump(exclude=ignore)
        assert decision.job.state == JobState.RECOVERING
    assert decision.job.volume is not None
    assert decision.job.volume.az == row.volume_az
    launched = decision.job.attempts[len(row.job.attempts) :]
    if row.launch_az is None:
        assert launched == ()
    else:
        assert [a.candidates[0].pool.az for a in launched] == [row.launch_az]
    # Nothing in any step deletes a volume.
    assert not any(isinstance(a, DeleteVolume) for a in decision.actions)


def test_a_move_records_why_and_the_launch_after_it_says_so() -> None:
    planned = decide(RECLAIMED_1, Observed({}, FREE, PRICES), NOW)
    move = planned.job.move
    assert move is not None
    assert move.reason.startswith(f"move from zone {AZ} to zone {ELSEWHERE}: ")
    assert planned.job.timeline[-1].kind == "moving-volume"
    snapshot = planned.actions[0]
    assert isinstance(snapshot, CreateSnapshot)
    assert (snapshot.volume_id, snapshot.move, snapshot.replay) == (VOLUME.volume_id, 1, False)

    done = moving(snapshot_id=SNAPSHOT, volume_id=NEW_VOLUME)
    seen = Observed(
        {},
        FREE,
        PRICES,
        snapshot=SnapshotView(SNAPSHOT, "completed"),
        moved_volume=restored("available"),
    )
    decision = decide(done, seen, NOW)
    assert decision.job.volume == Volume(
        volume_id=NEW_VOLUME, az=ELSEWHERE, created_by_spotctl=True, created_at=NOW
    )
    assert decision.job.kept_after_moves == (VOLUME.volume_id, SNAPSHOT)
    assert decision.job.attempts[-1].reason.startswith(MOVE.reason)
    assert decision.job.state == JobState.RECOVERING


def test_the_restore_is_idempotent_and_the_same_size() -> None:
    seen = Observed({}, FREE, PRICES, snapshot=SnapshotView(SNAPSHOT, "completed"))
    first = decide(moving(snapshot_id=SNAPSHOT), seen, NOW).actions[0]
    again = decide(moving(snapshot_id=SNAPSHOT), seen, NOW + 30).actions[0]
    assert first == again
    assert first == CreateVolume(ELSEWHERE, 50, SNAPSHOT, "j-0000000000000001-move-1", True)


def test_after_a_failed_move_the_job_stays_home_for_a_while() -> None:
    failed = moving(snapshot_id=SNAPSHOT)
    seen = Observed({}, FREE, PRICES, snapshot=SnapshotView(SNAPSHOT, "error"))
    decision = decide(failed, seen, NOW)
    assert any(e.kind == "move-failed" for e in decision.job.timeline)
    assert decision.job.kept_after_moves == (SNAPSHOT,)
    ended = decision.job.replace_attempt(
        decision.job.attempts[-1].model_copy(
            update={"instance_id": "i-9", "ended_at": NOW + 10, "end_reason": "reclaimed"}
        )
    )
    later = decide(ended, Observed({}, FREE, PRICES), NOW + 600)
    assert later.job.move is None
    assert later.job.attempts[-1].candidates[0].pool.az == AZ


def test_listed_exit_codes_restart_without_using_up_the_restarts_on_errors() -> None:
    gone = Observed(instances(**{"i-1": "terminated"}), volume("available", None), HOME_PRICES)
    listed = FAILED_1.model_copy(
        update={"spec": spec(max_restarts_on_errors=1, recover_on_exit_codes=(2,))}
    )
    after = decide(listed, gone, NOW).job
    assert (after.error_restarts, after.exit_code_restarts) == (0, 1)
    told = f"exit code 2; restart 1 on a listed exit code (at most {models.MAX_EXIT_CODE_RESTARTS})"
    assert after.timeline[-2].detail == told
    # Another code is an error: it uses the restart on errors, then the job fails.
    crashed = after.model_copy(update={"exit_code": 1, "exit_attempt": 2})
    up = Observed(instances(**{"i-2": "terminated"}), volume("available", None), HOME_PRICES)
    again = decide(crashed, up, NOW).job
    assert (again.state, again.error_restarts, again.exit_code_restarts) == (
        JobState.RECOVERING,
        1,
        1,
    )
    final = decide(again.model_copy(update={"exit_code": 1, "exit_attempt": 3}), up, NOW).job
    assert final.state is JobState.FAILED
    assert final.failure == (
        "the workload exited with code 1, "
        "after 1 restart(s) on errors and 1 restart(s) on listed exit codes"
    )
