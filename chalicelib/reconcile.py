"""The control loop: observe, ``decide`` (pure), act, write on the version we read.

Every trigger (an EC2 event, an API call) ends in :meth:`Reconciler.reconcile`; the
schedule sweep in :meth:`Reconciler.sweep`, the same pass for many jobs on one shared
observation. A duplicate, late or missing event changes nothing:
the next pass sees the same world and makes the same decision.

``decide(job, observed, now)`` is a pure function of the stored record, what EC2
shows, and the time. It returns the record to write and the actions to run, as data.
The executor runs them and folds their results back with the ``apply_*`` functions,
which are pure too.

Launches are written ahead: the attempt, with its ordered candidate pools and their
ClientTokens, is stored *before* RunInstances, so a Lambda that dies after launching
replays the same request and EC2 returns the same instance.

Moving the volume to another zone (when the policy picks a pool there and no
instance of the job is alive) takes passes, one step each, on the job's
``move``: (1) CreateSnapshot once the old volume is ``available`` (written ahead;
a replay finds the snapshot by its tags), (2) once the snapshot is ``completed``,
CreateVolume from it in the new zone (ClientToken), (3) once that volume is
``available``, it becomes the job's volume and the attempt launches there as
usual. A failed step drops the move and the job stays in its volume's zone for a
while. Safety rule: the old volume and the snapshot are never deleted by spotctl;
they are listed on the job (``kept_after_moves``) for the user to remove.

Leaving on-demand for spot: the sweep asks the policy, for a job running on
on-demand with a deadline and a work estimate, whether it is far enough ahead of
schedule to go back to spot (``placement.leave_on_demand``). If so, the attempt's
``left_at`` is written ahead and the instance is asked to go: tagged ``spotctl:leave``,
which its agent reads in the instance metadata, and then it stops the workload with
the checkpoint signal, syncs to S3, reports and shuts the instance down, as on a spot
notice. (TerminateInstances alone would leave the checkpoint to the OS's shutdown,
which EC2 gives no set time.) An instance still running ``LEAVE_DRAIN_SECONDS`` past
the job's grace is terminated. Once EC2 shows the instance going, the attempt ends
``left-on-demand`` (neither an interruption nor a failure) and the relaunch path
plans the next attempt with no instance running, attaching the volume when the old
instance has let it go.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from chalicelib import metrics, placement
from chalicelib.ec2 import (
    JOB_TAG,
    SHUT_DOWN_FROM_INSIDE,
    Ec2Gateway,
    InstanceView,
    LaunchSettings,
    SnapshotView,
    VolumeView,
)
from chalicelib.errors import (
    ConcurrentUpdate,
    Ec2Failure,
    InsufficientCapacity,
    ResourceMissing,
    SpotPriceTooLow,
    VolumeBusy,
)
from chalicelib.fleet import FleetRecords
from chalicelib.log import logger
from chalicelib.models import (
    ENDED_CANCELLED,
    ENDED_COMPLETED,
    ENDED_FAILED,
    ENDED_INTERRUPTED,
    ENDED_LAUNCH_FAILED,
    ENDED_LEFT_ON_DEMAND,
    ENDED_RECLAIMED,
    ENDED_SHUT_DOWN,
    ENDED_STOPPED,
    Attempt,
    Job,
    JobState,
    Pool,
    Volume,
    VolumeMove,
    iso,
)
from chalicelib.store import JobStore

RETRY_LAUNCH_AFTER_SECONDS = 300.0  # WAITING: how long before the sweep tries again
# A job's own volume_id attached to an instance not the job's: looked at again this
# often, and the job fails after this long (the user's other work holds it).
VOLUME_BUSY_RECHECK_SECONDS = 60.0
VOLUME_BUSY_LIMIT_SECONDS = 1800.0
# A job with a deadline whose launch EC2 refused plans again at the next sweep, while
# the refusal is remembered (placement.CAPACITY_MEMORY_SECONDS): the policy then weighs
# waiting against on-demand knowing spot is out, as the simulator's policy does.
REPLAN_AFTER_REFUSAL_SECONDS = 60.0
WARNED_INSTANCE_GRACE_SECONDS = 300.0  # a warned instance still alive after this is ours to end
# Every launch is recorded (or adopted, or ended by the pass that made it) within one
# invocation; a spotctl instance no record names after this long never will be.
ORPHAN_AFTER_SECONDS = 900.0
SWEEP_OBSERVATION_MAX_AGE_SECONDS = 30.0  # a sweep looks again at jobs not visited by then
MOVE_WAIT_FOR_VOLUME_SECONDS = 600.0  # a move gives up if the volume is not free by then
# An on-demand instance we asked to leave that still shows running this long after the
# job's grace (its agent's stop, sync and shutdown overran, or it is not listening):
# terminate it; the OS's shutdown still gives the agent its SIGTERM.
LEAVE_DRAIN_SECONDS = 300.0


# -- what we observe ---------------------------------------------------------------

# Pools' fleet records, as looked up for a pass (None: not looked up, or unreadable).
FleetView = Mapping[Pool, Sequence[placement.CapacityObservation]] | None


@dataclass(frozen=True)
class Observed:
    """What EC2 shows for one job at the time of a pass."""

    # Every attempt's instance that has not ended; None = not looked up yet.
    instances: Mapping[str, InstanceView] | None = None
    volume: VolumeView | None = None  # the job's volume; None while it has none (or unknown)
    prices: Mapping[Pool, float] | None = None  # current spot prices; None = not looked up
    fleet: FleetView = None  # the offered pools' fleet records (what other jobs saw there)
    # Only while a move is under way: its snapshot and the volume restored from it.
    snapshot: SnapshotView | None = None
    moved_volume: VolumeView | None = None

    def instance(self, instance_id: str) -> InstanceView | None:
        return (self.instances or {}).get(instance_id)


# -- what we do ------------------------------------------------------------------


@dataclass(frozen=True)
class CreateVolume:
    az: str
    size_gib: int | None
    snapshot_id: str | None
    client_token: str
    for_move: bool = False  # the restored volume of the job's move, not yet its volume


@dataclass(frozen=True)
class CreateSnapshot:
    """Snapshot the job's (detached) volume for move number ``move``."""

    volume_id: str
    move: int
    # Written ahead by an earlier pass that may have died after CreateSnapshot: look
    # for its snapshot (by tag) before taking one.
    replay: bool = False


@dataclass(frozen=True)
class Launch:
    attempt: int  # the recorded attempt whose candidates to try, in order
    # Written ahead by an earlier pass that may have died after RunInstances: look for
    # what it launched (by tag) before trying the candidates again.
    replay: bool = False


@dataclass(frozen=True)
class TerminateLaunched:
    """End whatever a dead pass launched for these attempts (they end unlaunched)."""

    attempts: tuple[int, ...]


@dataclass(frozen=True)
class AttachVolume:
    volume_id: str
    instance_id: str


@dataclass(frozen=True)
class Terminate:
    instance_ids: tuple[str, ...]


@dataclass(frozen=True)
class DeleteVolume:
    volume_id: str


@dataclass(frozen=True)
class LeaveOnDemand:
    """Ask the job's on-demand instance to drain and go, to go back to spot (written
    ahead: the record says why the instance went before it is asked)."""

    instance_id: str
    attempt: int


Action = (
    CreateVolume
    | CreateSnapshot
    | Launch
    | AttachVolume
    | Terminate
    | DeleteVolume
    | TerminateLaunched
    | LeaveOnDemand
)


@dataclass(frozen=True)
class Decision:
    job: Job  # the record to write (its version is still the one read)
    actions: tuple[Action, ...] = ()
    needs_prices: bool = False  # decide again once spot prices are observed
    needs_observation: bool = False  # decide again once instances and volume are observed


# -- deciding --------------------------------------------------------------------


def decide(job: Job, observed: Observed, now: float, sweeping: bool = False) -> Decision:
    """The next record and actions for ``job``, given what EC2 shows at ``now``.

    ``sweeping``: the schedule sweep's pass, which also asks whether a job running on
    on-demand should go back to spot. Event passes do not: the question needs spot
    prices, and the sweep (every minute, prices shared by all its jobs) asks often
    enough.
    """
    if observed.instances is None:
        if _warned_and_not_replaced(job):
            # The fast path of a recovery: the notice says the instance is going, and
            # the replacement needs only prices, so it is requested before anything
            # else is looked at; the next pass observes and moves the volume.
            return _next_attempt(job, observed, now, [])
        return Decision(job, needs_observation=True)
    job, terminate = _account_for_instances(job, observed, now)

    if job.state.is_terminal():
        return Decision(job, _terminate(terminate, _alive_ids(job, observed, now)))
    if job.cancel_requested_at is not None:
        return _cancel(job, observed, now, terminate)
    if _restarts_after_error(job):
        return _restart_after_error(job, observed, now, terminate)
    if job.exit_code is not None:
        return _complete(job, observed, now, terminate)
    silent = _silent_shutdowns(job)
    if silent >= MAX_SILENT_SHUTDOWNS:
        why = (
            f"its last {silent} instances shut themselves down and none of their reports "
            "reached the API: can instances reach it? (their logs go to S3, under logs/)"
        )
        job = _fail(job, now, why)
        return Decision(job, _terminate(terminate, _alive_ids(job, observed, now)))

    if job.volume is None and job.spec.volume_id is not None:
        job = _adopt_existing_volume(job, observed, now)
        if job.state.is_terminal():
            return Decision(job, _terminate(terminate, _alive_ids(job, observed, now)))
        if job.volume is None:  # attached elsewhere: launch nothing until it is free
            update = {"state": JobState.WAITING, "wait_until": now + VOLUME_BUSY_RECHECK_SECONDS}
            return Decision(job.model_copy(update=update), _terminate(terminate))

    if (
        job.volume is not None
        and observed.volume is not None
        and observed.volume.gone
        and not _not_visible_yet(observed.volume.state, job.volume.created_at, now)
    ):
        return _volume_lost(job, observed, now, terminate)

    current = job.current
    if job.move is not None and (current is None or current.ended):
        return _move_volume(job, job.move, observed, now, terminate)
    if current is None or current.ended:
        return _next_attempt(job, observed, now, terminate)
    if current.instance_id is None:
        # Written ahead but not launched (the last pass died or is still running).
        launch = Launch(current.number, replay=True)
        return Decision(job, (*_creates_for(job, current), launch, *_terminate(terminate)))

    instance = observed.instance(current.instance_id)
    if (
        instance is None
        or instance.state == "pending"
        or _not_visible_yet(instance.state, current.requested_at, now)
    ):
        return Decision(job, _terminate(terminate))
    if current.warned_at is not None:
        return _next_attempt(job, observed, now, terminate)
    if current.left_at is not None:
        return _await_left_instance(job, current, now, terminate)
    if sweeping and _may_leave_on_demand(job, current, instance, observed):
        if observed.prices is None:
            return Decision(job, _terminate(terminate), needs_prices=True)
        reason = placement.leave_on_demand(job, observed.prices, now, observed.fleet)
        if reason is not None:
            return _leave_on_demand(job, current, now, terminate, reason)
    return _place_volume(job, current, instance, observed, now, terminate)


def _may_leave_on_demand(
    job: Job, current: Attempt, instance: InstanceView, observed: Observed
) -> bool:
    """Whether to ask the policy about leaving on-demand: the job runs on an on-demand
    instance with its volume attached, and has the deadline and the work estimate by
    which the policy judges being ahead of schedule."""
    volume = observed.volume
    return (
        job.state == JobState.RUNNING
        and current.market == "on-demand"
        and instance.state == "running"
        and job.move is None
        and job.volume is not None
        and volume is not None
        and volume.attached_to == current.instance_id
        and job.spec.deadline is not None
        and job.spec.expected_hours is not None
    )


def _leave_on_demand(
    job: Job, current: Attempt, now: float, terminate: list[str], reason: str
) -> Decision:
    """End the on-demand instance; the attempt ends once EC2 shows it going, and the
    relaunch path (no instance running) plans the spot attempt."""
    instance_id = current.instance_id
    assert instance_id is not None
    job = job.replace_attempt(current.model_copy(update={"left_at": now}))
    job = job.model_copy(update={"state": JobState.INTERRUPTED})
    job = job.with_event(now, "leaving-on-demand", f"{instance_id}: {reason}", current.number)
    leave = LeaveOnDemand(instance_id, current.number)
    return Decision(job, (leave, *_terminate(terminate)))


def _await_left_instance(job: Job, current: Attempt, now: float, terminate: list[str]) -> Decision:
    """The instance we are leaving still shows running: ask it to go if the pass that
    decided to leave died before asking, wait for its agent to drain it, and end it
    once that has taken ``LEAVE_DRAIN_SECONDS`` past the job's grace."""
    assert current.left_at is not None and current.instance_id is not None
    if now - current.left_at > job.spec.checkpoint.grace_seconds + LEAVE_DRAIN_SECONDS:
        return Decision(job, _terminate(terminate, [current.instance_id]))
    if current.leave_asked_at is None:
        leave = LeaveOnDemand(current.instance_id, current.number)
        return Decision(job, (leave, *_terminate(terminate)))
    return Decision(job, _terminate(terminate))


def _warned_and_not_replaced(job: Job) -> bool:
    current = job.current
    return (
        not job.state.is_terminal()
        and job.cancel_requested_at is None
        and job.exit_code is None
        and job.volume is not None
        and current is not None
        and current.instance_id is not None
        and current.warned_at is not None
        and not current.ended
    )


def _account_for_instances(job: Job, observed: Observed, now: float) -> tuple[Job, list[str]]:
    """End attempts whose instance is gone; note first sight of running ones.

    Returns the updated job and the instances that must be terminated (stopped ones,
    and warned ones that outlived their notice).
    """
    terminate: list[str] = []
    for attempt in job.attempts:
        if attempt.ended or attempt.instance_id is None:
            continue
        view = observed.instance(attempt.instance_id)
        if view is None or _not_visible_yet(view.state, attempt.requested_at, now):
            continue
        if view.gone:
            reason = _why_gone(job, attempt, view)
            job = _end_attempt(job, attempt, reason, now)
            detail = f"{attempt.instance_id} {view.state}"
            job = job.with_event(now, f"instance-{reason}", detail, attempt.number)
        elif view.state in ("stopping", "stopped"):
            terminate.append(attempt.instance_id)
            job = _end_attempt(job, attempt, ENDED_STOPPED, now)
            job = job.with_event(now, "instance-stopped", attempt.instance_id, attempt.number)
        elif view.state == "running" and attempt.running_at is None:
            job = job.replace_attempt(attempt.model_copy(update={"running_at": now}))
            job = job.with_event(now, "instance-running", attempt.instance_id, attempt.number)
        elif (
            attempt is not job.current
            and attempt.warned_at is not None
            and now - attempt.warned_at > WARNED_INSTANCE_GRACE_SECONDS
        ):
            terminate.append(attempt.instance_id)
    return job, terminate


def _why_gone(job: Job, attempt: Attempt, view: InstanceView) -> str:
    if job.cancel_requested_at is not None:
        return ENDED_CANCELLED
    if job.exit_code is not None:
        return ENDED_FAILED if _restarts_after_error(job) else ENDED_COMPLETED
    if attempt.left_at is not None:
        return ENDED_LEFT_ON_DEMAND
    if attempt.warned_at is not None or _agent_told(job, attempt, "agent-interrupted"):
        return ENDED_INTERRUPTED
    if view.reason == SHUT_DOWN_FROM_INSIDE:
        return ENDED_SHUT_DOWN
    return ENDED_RECLAIMED


def _agent_told(job: Job, attempt: Attempt, kind: str) -> bool:
    return any(e.kind == kind and e.attempt == attempt.number for e in job.timeline)


# Instances that shut themselves down without a word reaching the API, one after the
# other, before the job fails instead of launching another: they cannot report (no
# route to the API, say), and each would run and bill in vain.
MAX_SILENT_SHUTDOWNS = 3


def _silent_shutdowns(job: Job) -> int:
    """How many of the job's last instances that had its volume, in a row, shut down
    unexplained. One the volume never reached is not counted (bootstrap gives up on
    a volume that does not come, untold, so that a new instance may get it)."""
    count = 0
    for attempt in reversed(job.attempts):
        if attempt.instance_id is None or not _had_volume(job, attempt):
            continue
        if attempt.end_reason != ENDED_SHUT_DOWN:
            break
        count += 1
    return count


def _had_volume(job: Job, attempt: Attempt) -> bool:
    """Whether the job's volume was attached to the attempt's instance (its "running"
    event; records from before it named the attempt name the instance)."""
    attached = f" attached to {attempt.instance_id}"
    return any(
        e.kind == "running" and (e.attempt == attempt.number or e.detail.endswith(attached))
        for e in job.timeline
    )


def _end_attempt(job: Job, attempt: Attempt, reason: str, now: float) -> Job:
    ended = attempt.model_copy(update={"ended_at": now, "end_reason": reason})
    return job.replace_attempt(ended)


def _alive_ids(job: Job, observed: Observed, now: float) -> list[str]:
    alive = []
    for attempt in job.attempts:
        if attempt.instance_id is None:
            continue
        view = observed.instance(attempt.instance_id)
        if view is None:
            continue
        if not view.gone or _not_visible_yet(view.state, attempt.requested_at, now):
            alive.append(attempt.instance_id)
    return alive


# EC2 is eventually consistent: for a while after RunInstances or CreateVolume, a
# describe may not show what was just made (its NotFound "does not mean the instance
# has been terminated", says the EC2 API reference). Something EC2 does not show is
# taken for gone only this long after it was made; until then it may be coming.
NOT_VISIBLE_GRACE_SECONDS = 300.0


def _not_visible_yet(state: str, made_at: float | None, now: float) -> bool:
    return state == "missing" and made_at is not None and now - made_at < NOT_VISIBLE_GRACE_SECONDS


def _terminate(*groups: Sequence[str]) -> tuple[Action, ...]:
    ids = tuple(sorted({iid for group in groups for iid in group}))
    return (Terminate(ids),) if ids else ()


def _cancel(job: Job, observed: Observed, now: float, terminate: list[str]) -> Decision:
    if job.move is not None:
        job = apply_move_failed(job, "the job was cancelled", now)
    alive = _alive_ids(job, observed, now)
    pending_launch = [a for a in job.attempts if not a.ended and a.instance_id is None]
    for attempt in pending_launch:
        job = _end_attempt(job, attempt, ENDED_CANCELLED, now)
    # A pass that died after RunInstances may have left an instance no record names.
    orphans: tuple[Action, ...] = ()
    if pending_launch:
        orphans = (TerminateLaunched(tuple(a.number for a in pending_launch)),)
    since = job.cancel_requested_at if job.cancel_requested_at is not None else now
    drain = (
        job.delete_volume_on_cancel
        and now - since <= job.spec.checkpoint.grace_seconds + LEAVE_DRAIN_SECONDS
    )
    if alive:
        if job.state != JobState.CANCELLING:
            job = job.model_copy(update={"state": JobState.CANCELLING})
            doing = "asking to drain" if drain else "terminating"
            job = job.with_event(now, "cancelling", f"{doing} {', '.join(alive)}")
        if drain:
            # Deleting the volume needs the agent's word that its data is in S3. Asked to
            # leave (the tag it watches), it stops the workload, syncs, says so and shuts
            # down; a terminate's SIGTERM may reach it only once the OS has taken the
            # network down. Past the drain's time, the instances are terminated.
            asks = [
                LeaveOnDemand(a.instance_id, a.number)
                for a in job.attempts
                if a.instance_id in alive and a.leave_asked_at is None
            ]
            return Decision(job, (*orphans, *asks, *_terminate(terminate)))
        return Decision(job, (*orphans, *_terminate(terminate, alive)))
    for attempt in job.attempts:
        if not attempt.ended:
            job = _end_attempt(job, attempt, ENDED_CANCELLED, now)
    actions: list[Action] = [*orphans, *_terminate(terminate)]
    volume = job.volume
    if not job.delete_volume_on_cancel or volume is None:
        return Decision(_cancelled(job, now), tuple(actions))
    why_kept, report_due = _why_volume_kept(job)
    free = observed.volume is not None and observed.volume.state == "available"
    gone = observed.volume is None or (
        observed.volume.gone and not _not_visible_yet(observed.volume.state, volume.created_at, now)
    )
    if not gone and ((why_kept is None and not free) or report_due):
        # The instance is gone, but its volume may still be detaching, and the agent's
        # last report (its final sync) may still be on its way: wait for both, a while.
        if now - since < CANCEL_VOLUME_WAIT_SECONDS:
            job = job.model_copy(update={"state": JobState.CANCELLING})
            if job.timeline[-1].kind != "volume-wait":
                job = job.with_event(now, "volume-wait", _volume_wait_detail(volume, why_kept))
            return Decision(job, tuple(actions))
        if why_kept is None:
            state = observed.volume.state if observed.volume is not None else "missing"
            minutes = CANCEL_VOLUME_WAIT_SECONDS // 60
            why_kept = f"it was still {state} {minutes} min after the cancel"
    job = _cancelled(job, now)
    if gone:
        return Decision(job, tuple(actions))
    if why_kept is not None:
        return Decision(job.with_event(now, "volume-kept", why_kept), tuple(actions))
    actions.append(DeleteVolume(volume.volume_id))
    return Decision(job.with_event(now, "volume-deleted", volume.volume_id), tuple(actions))


# How long a cancel that deletes the volume waits, after the request, for the volume to
# be detached and for the last instance's final report (the agent retries it 10 min).
CANCEL_VOLUME_WAIT_SECONDS = 15 * 60


def _cancelled(job: Job, now: float) -> Job:
    return job.model_copy(update={"state": JobState.CANCELLED}).with_event(now, "cancelled")


def _why_volume_kept(job: Job) -> tuple[str | None, bool]:
    """Why a cancel may not delete the job's volume (None: its data is safe elsewhere),
    and whether a report still on its way could make it safe.

    Safe means: spotctl made the volume, the job has an S3 copy, and the last instance
    that had the volume said in its last report that its final sync, after the
    workload stopped, worked. A volume no instance ever had holds only what it was
    made from (nothing, or a snapshot that stays)."""
    volume = job.volume
    assert volume is not None
    if not volume.created_by_spotctl:
        return "spotctl did not create it; it stays", False
    ran = [a.number for a in job.attempts if a.instance_id is not None]
    if not ran:
        return None, False
    if job.results_prefix is None:
        return "the job has no S3 prefix: its data is on the volume alone", False
    if job.final_sync_attempt != ran[-1]:
        return f"attempt {ran[-1]} did not report a final sync to S3 that worked", True
    return None, False


def _volume_wait_detail(volume: Volume, why_kept: str | None) -> str:
    what = "it to be detached" if why_kept is None else "the last instance's final sync"
    return f"{volume.volume_id}: waiting for {what} before deleting it"


def _complete(job: Job, observed: Observed, now: float, terminate: list[str]) -> Decision:
    code = job.exit_code
    assert code is not None
    for attempt in job.attempts:
        if not attempt.ended:
            job = _end_attempt(job, attempt, ENDED_COMPLETED, now)
    state = JobState.SUCCEEDED if code == 0 else JobState.FAILED
    update: dict[str, object] = {"state": state}
    if code != 0:
        failure = f"the workload exited with code {code}"
        if job.exit_detail and job.exit_detail != "sync ok":  # the agent's or bootstrap's
            failure += f" ({job.exit_detail})"
        restarts = [
            f"{n} restart(s) on {what}"
            for n, what in (
                (job.error_restarts, "errors"),
                (job.exit_code_restarts, "listed exit codes"),
            )
            if n
        ]
        if restarts:
            failure += ", after " + " and ".join(restarts)
        update["failure"] = failure
    job = job.model_copy(update=update).with_event(now, state.value.lower(), f"exit code {code}")
    return Decision(job, _terminate(terminate, _alive_ids(job, observed, now)))


def _restarts_after_error(job: Job) -> bool:
    """Whether the workload exited non-zero and the spec allows starting it again."""
    return job.restart_for(job.exit_code) is not None


def _restart_after_error(
    job: Job, observed: Observed, now: float, terminate: list[str]
) -> Decision:
    """Start a failed workload again, from its volume (its last checkpoint), once none
    of the job's instances is alive: the agent shuts its instance down after reporting
    the exit, and we terminate it too rather than wait on that. The next attempt is
    planned as any relaunch is, so it may go to another pool or zone."""
    alive = _alive_ids(job, observed, now)
    if alive:
        return Decision(job, _terminate(terminate, alive))
    # A launch written ahead but never seen (a pass that died) is ended like the rest;
    # an instance it may have started is found by its client token and terminated.
    pending = [a for a in job.attempts if not a.ended]
    for attempt in pending:
        job = _end_attempt(job, attempt, ENDED_FAILED, now)
    orphans: tuple[Action, ...] = ()
    if pending:
        orphans = (TerminateLaunched(tuple(a.number for a in pending)),)
    code = job.exit_code
    job, told = job.restarted(code)
    update = {
        "exit_code": None,
        "exit_attempt": None,
        "exit_detail": "",
        "state": JobState.RECOVERING,
    }
    job = job.model_copy(update=update)
    detail = f"exit code {code}; {told}"
    job = job.with_event(now, "restarting-after-error", detail)
    decision = _next_attempt(job, observed, now, terminate)
    return replace(decision, actions=(*orphans, *decision.actions))


def _adopt_existing_volume(job: Job, observed: Observed, now: float) -> Job:
    volume = observed.volume
    volume_id = job.spec.volume_id
    assert volume_id is not None
    if volume is None or volume.gone:
        return _fail(job, now, f"volume {volume_id} does not exist")
    if job.spec.availability_zones and volume.az not in job.spec.availability_zones:
        return _fail(job, now, f"volume {volume_id} is in {volume.az}, outside the job's zones")
    if volume.attached_to is not None:
        # Not to an instance of ours: nothing is launched before the volume is adopted.
        busy = f"{volume_id} is attached to {volume.attached_to}, not this job's"
        since = next((e.at for e in job.timeline if e.kind == "volume-busy"), None)
        if since is None:
            return job.with_event(now, "volume-busy", f"{busy}: waiting for it to be free")
        if now - since >= VOLUME_BUSY_LIMIT_SECONDS:
            minutes = VOLUME_BUSY_LIMIT_SECONDS / 60
            return _fail(job, now, f"volume {busy}, still after {minutes:g} min")
        return job
    adopted = Volume(volume_id=volume_id, az=volume.az, created_by_spotctl=False)
    return job.model_copy(update={"volume": adopted}).with_event(now, "volume-adopted", volume_id)


def _fail(job: Job, now: float, why: str) -> Job:
    failed = job.model_copy(update={"state": JobState.FAILED, "failure": why})
    return failed.with_event(now, "failed", why)


MAX_VOLUMES_LOST = 3  # a job fails when it loses this many volumes


def _volume_lost(job: Job, observed: Observed, now: float, terminate: list[str]) -> Decision:
    """The job's volume is gone: restart from S3 on a new volume, or fail."""
    volume = job.volume
    assert volume is not None
    if not volume.created_by_spotctl or job.results_prefix is None:
        job = _fail(job, now, f"volume {volume.volume_id} was lost and no S3 copy exists")
        return Decision(job, _terminate(terminate, _alive_ids(job, observed, now)))
    lost = 1 + sum(1 for e in job.timeline if e.kind == "volume-lost")
    if lost >= MAX_VOLUMES_LOST:
        # EBS loses a volume rarely; one after another means the next will go the same
        # way (a snapshot whose key we may not use makes volumes that fail at once).
        state = observed.volume.state if observed.volume is not None else "missing"
        why = f"{lost} volumes lost, the last {volume.volume_id} ({state}): not making another"
        job = _fail(job, now, why)
        return Decision(job, _terminate(terminate, _alive_ids(job, observed, now)))
    job = job.model_copy(update={"volume": None, "move": None})
    job = job.with_event(now, "volume-lost", f"{volume.volume_id}; a new volume restores from S3")
    current = job.current
    if current is not None and not current.ended:
        job = _end_attempt(job, current, ENDED_RECLAIMED, now)
    alive = _alive_ids(job, observed, now)
    decision = _next_attempt(job, replace(observed, volume=None), now, terminate + alive)
    return decision


def _next_attempt(
    job: Job, observed: Observed, now: float, terminate: list[str], why_here: str = ""
) -> Decision:
    """Plan (and write ahead) a new attempt, start a move of the volume, or wait."""
    if job.state == JobState.WAITING and job.wait_until is not None and now < job.wait_until:
        return Decision(job, _terminate(terminate))
    if observed.prices is None:
        return Decision(job, _terminate(terminate), needs_prices=True)

    number = len(job.attempts) + 1
    previous = job.current
    # Only with no instance of the job alive (its volume is free to snapshot) and
    # with the volume observed.
    movable = (
        not why_here  # just moved: launch where the volume now is
        and (previous is None or previous.ended)
        and observed.instances is not None
        and not _alive_ids(job, observed, now)
        and placement.can_move(job, now)
    )
    plan = placement.plan(job, observed.prices, now, number, movable, observed.fleet)
    first = not any(a.instance_id for a in job.attempts)
    volume = job.volume
    if plan.candidates and volume is not None and plan.candidates[0].pool.az != volume.az:
        to_az = plan.candidates[0].pool.az
        move = VolumeMove(
            number=job.moves + 1,
            from_volume_id=volume.volume_id,
            from_az=volume.az,
            to_az=to_az,
            reason=f"move from zone {volume.az} to zone {to_az}: {plan.reason}",
            requested_at=now,
        )
        update = {"move": move, "moves": move.number, "state": JobState.RECOVERING}
        job = job.model_copy(update={**update, "wait_until": None})
        job = job.with_event(now, "moving-volume", move.reason)
        return _move_volume(job, move, observed, now, terminate)
    if not plan.candidates:
        # The policy's wait is "decide again by then at the latest": spot's return is
        # learnt only by trying (or from another job's record), so try again sooner.
        until = now + RETRY_LAUNCH_AFTER_SECONDS
        if plan.wait_until is not None:
            until = min(until, plan.wait_until)
        job = job.model_copy(update={"state": JobState.WAITING, "wait_until": until})
        job = job.with_event(now, "waiting", plan.reason)
        return Decision(job, _terminate(terminate))

    attempt = Attempt(
        number=number,
        reason=f"{why_here}; {plan.reason}" if why_here else plan.reason,
        candidates=plan.candidates,
        requested_at=now,
    )
    if first:
        state = JobState.PROVISIONING
    elif previous is not None and not previous.ended:
        state = JobState.INTERRUPTED  # the warned instance still runs its last two minutes
    else:
        state = JobState.RECOVERING
    job = job.model_copy(
        update={"attempts": (*job.attempts, attempt), "state": state, "wait_until": None}
    )
    job = job.with_event(now, "launch-requested", plan.reason, number)
    return Decision(job, (*_creates_for(job, attempt), Launch(number), *_terminate(terminate)))


def _move_volume(
    job: Job, move: VolumeMove, observed: Observed, now: float, terminate: list[str]
) -> Decision:
    """The next step of moving the job's volume to ``move.to_az`` (no instance alive)."""
    wait = Decision(job, _terminate(terminate))
    if move.snapshot_id is None:
        old = observed.volume
        if old is None or old.state != "available" or old.attached_to is not None:
            # Never snapshot a volume a live instance may still write; a volume that
            # stays busy gives the move up, and the job goes on where it is.
            if now - move.requested_at > MOVE_WAIT_FOR_VOLUME_SECONDS:
                return _move_failed(job, observed, now, terminate, "the volume stayed busy")
            return wait
        replay = move.snapshot_requested
        if not replay:
            job = job.model_copy(
                update={"move": move.model_copy(update={"snapshot_requested": True})}
            )
        return Decision(
            job, (CreateSnapshot(move.from_volume_id, move.number, replay), *_terminate(terminate))
        )
    snapshot = observed.snapshot
    if snapshot is None:
        return wait
    if snapshot.failed:
        return _move_failed(job, observed, now, terminate, f"snapshot {snapshot.state}")
    if snapshot.state != "completed":
        return wait  # the sweep looks again
    if move.volume_id is None:
        size = observed.volume.size_gib if observed.volume and observed.volume.size_gib else None
        create = CreateVolume(
            move.to_az,
            size or job.spec.volume_gib,
            move.snapshot_id,
            f"{job.job_id}-move-{move.number}",
            for_move=True,
        )
        return Decision(job, (create, *_terminate(terminate)))
    restored = observed.moved_volume
    if restored is None or restored.state == "creating":
        return wait
    if restored.gone:
        return _move_failed(job, observed, now, terminate, f"new volume {restored.state}")
    new = Volume(volume_id=move.volume_id, az=move.to_az, created_by_spotctl=True, created_at=now)
    kept = (*job.kept_after_moves, move.from_volume_id, move.snapshot_id)
    job = job.model_copy(update={"volume": new, "move": None, "kept_after_moves": kept})
    detail = (
        f"{move.from_volume_id}@{move.from_az} -> {new.volume_id}@{new.az} via {move.snapshot_id}"
    )
    job = job.with_event(now, "volume-moved", detail)
    moved = replace(observed, volume=restored, snapshot=None, moved_volume=None)
    return _next_attempt(job, moved, now, terminate, why_here=move.reason)


def _move_failed(
    job: Job, observed: Observed, now: float, terminate: list[str], why: str
) -> Decision:
    """Drop the move; the job goes on in its volume's zone (which it never left)."""
    job = apply_move_failed(job, why, now)
    return _next_attempt(job, observed, now, terminate)


def _creates_for(job: Job, attempt: Attempt) -> tuple[Action, ...]:
    if job.volume is not None:
        return ()
    az = attempt.candidates[0].pool.az
    token = f"{job.job_id}-volume-{attempt.number}"
    return (CreateVolume(az, job.spec.volume_gib, job.spec.snapshot_id, token),)


def _place_volume(
    job: Job,
    current: Attempt,
    instance: InstanceView,
    observed: Observed,
    now: float,
    terminate: list[str],
) -> Decision:
    """The current instance runs: get the job's volume onto it."""
    instance_id = current.instance_id
    volume = observed.volume
    assert instance_id is not None
    if job.volume is None or volume is None or volume.state == "creating":
        return Decision(job, _terminate(terminate))
    if volume.attached_to == instance_id:
        if job.state != JobState.RUNNING:
            job = job.model_copy(update={"state": JobState.RUNNING})
            job = job.with_event(now, "running", f"{volume.volume_id} on {instance_id}")
        return Decision(job, _terminate(terminate))
    if volume.az and instance.az and volume.az != instance.az:
        # Never attach across zones; this instance cannot use the data.
        job = _end_attempt(job, current, ENDED_RECLAIMED, now)
        job = job.with_event(now, "wrong-zone", f"{instance_id} in {instance.az}", current.number)
        return _next_attempt(job, observed, now, [*terminate, instance_id])
    if volume.state == "available":
        return Decision(job, (AttachVolume(volume.volume_id, instance_id), *_terminate(terminate)))
    # In use by the previous instance: wait for it to go (the sweep ends stragglers).
    return Decision(job, _terminate(terminate))


# -- folding results back in ----------------------------------------------------


def apply_volume_created(job: Job, action: CreateVolume, volume_id: str, now: float) -> Job:
    volume = Volume(volume_id=volume_id, az=action.az, created_by_spotctl=True, created_at=now)
    return job.model_copy(update={"volume": volume}).with_event(now, "volume-created", volume_id)


def apply_snapshot_started(job: Job, snapshot_id: str, now: float) -> Job:
    move = job.move
    assert move is not None
    job = job.model_copy(update={"move": move.model_copy(update={"snapshot_id": snapshot_id})})
    return job.with_event(now, "snapshot-started", f"{snapshot_id} of {move.from_volume_id}")


def apply_moved_volume_created(job: Job, volume_id: str, now: float) -> Job:
    move = job.move
    assert move is not None
    job = job.model_copy(update={"move": move.model_copy(update={"volume_id": volume_id})})
    return job.with_event(now, "volume-restoring", f"{volume_id} in {move.to_az}")


def apply_move_failed(job: Job, why: str, now: float) -> Job:
    """The next pass plans again, in the volume's zone (see ``placement.can_move``)."""
    move = job.move
    assert move is not None
    left = tuple(r for r in (move.snapshot_id, move.volume_id) if r is not None)
    job = job.model_copy(update={"move": None, "kept_after_moves": (*job.kept_after_moves, *left)})
    return job.with_event(now, "move-failed", f"to {move.to_az}: {why}")


def apply_launched(job: Job, number: int, index: int, instance_id: str, now: float) -> Job:
    attempt = job.attempt(number)
    assert attempt is not None
    chosen = attempt.candidates[index]
    spot_price = chosen.expected_price
    launched = attempt.model_copy(
        update={
            "instance_id": instance_id,
            "pool": chosen.pool,
            "market": chosen.market,
            "max_price": chosen.max_price,
            "price": spot_price,
            "on_demand_price": placement.on_demand_price_of(job, chosen.pool.instance_type),
        }
    )
    job = job.replace_attempt(launched)
    if job.state == JobState.INTERRUPTED:
        job = job.model_copy(update={"state": JobState.RECOVERING})
    detail = f"{instance_id} {chosen.market} in {chosen.pool} at ${spot_price:.4f}/h"
    return job.with_event(now, "launched", detail, number)


def apply_launch_failed(job: Job, number: int, errors: Sequence[str], now: float) -> Job:
    attempt = job.attempt(number)
    assert attempt is not None
    job = _end_attempt(job, attempt, ENDED_LAUNCH_FAILED, now)
    scheduled = job.spec.deadline is not None and job.spec.expected_hours is not None
    retry = REPLAN_AFTER_REFUSAL_SECONDS if scheduled else RETRY_LAUNCH_AFTER_SECONDS
    job = job.model_copy(update={"state": JobState.WAITING, "wait_until": now + retry})
    return job.with_event(now, "waiting", "; ".join(errors), number)


def apply_attached(job: Job, action: AttachVolume, now: float) -> Job:
    job = job.model_copy(update={"state": JobState.RUNNING})
    number = next((a.number for a in job.attempts if a.instance_id == action.instance_id), None)
    detail = f"{action.volume_id} attached to {action.instance_id}"
    return job.with_event(now, "running", detail, number)


def apply_leave_asked(job: Job, action: LeaveOnDemand, now: float) -> Job:
    attempt = job.attempt(action.attempt)
    if attempt is None or attempt.leave_asked_at is not None:
        return job
    return job.replace_attempt(attempt.model_copy(update={"leave_asked_at": now}))


# -- signals: what events and reports add to the record ------------------------------


def note_warning(instance_id: str) -> Callable[[Job, float], Job]:
    def apply(job: Job, now: float) -> Job:
        for attempt in job.attempts:
            if attempt.instance_id == instance_id and attempt.warned_at is None:
                job = job.replace_attempt(attempt.model_copy(update={"warned_at": now}))
                return job.with_event(now, "interruption-warning", instance_id, attempt.number)
        return job

    return apply


def note_rebalance(instance_id: str) -> Callable[[Job, float], Job]:
    def apply(job: Job, now: float) -> Job:
        attempt = next((a for a in job.attempts if a.instance_id == instance_id), None)
        if attempt is None or any(
            e.kind == "rebalance-recommendation" and e.attempt == attempt.number
            for e in job.timeline
        ):
            return job
        return job.with_event(now, "rebalance-recommendation", instance_id, attempt.number)

    return apply


# -- the executor ------------------------------------------------------------------


def _price_zones(job: Job, now: float) -> list[str] | None:
    """Where prices are looked up: every zone when the volume may move, but one zone's
    for a warned job's replacement (its instance still runs: no move)."""
    movable = placement.can_move(job, now) and not _warned_and_not_replaced(job)
    return placement.zones_offered(job, movable)


def _pools_offered(job: Job, prices: Mapping[Pool, float], now: float) -> frozenset[Pool]:
    """Every pool the job's placement may quote: its types in the zones prices were
    looked up for (or that have a price)."""
    zones = _price_zones(job, now)
    if zones is None:
        zones = [pool.az for pool in prices]
    return frozenset(Pool(instance_type=t, az=az) for t in job.spec.instance_types for az in zones)


def _instances_to_observe(job: Job) -> list[str]:
    return [a.instance_id for a in job.attempts if a.instance_id and not a.ended]


def _volume_to_observe(job: Job) -> str | None:
    if job.state.is_terminal():
        return None
    return job.volume.volume_id if job.volume else job.spec.volume_id


@dataclass(frozen=True)
class SweepObservation:
    """What a sweep's few describe calls showed, for all the jobs it visits."""

    instances: Mapping[str, InstanceView]
    volumes: Mapping[str, VolumeView]
    at: float  # when it was looked up

    def slice(self, job: Job) -> Observed:
        """The job's part, exactly what :meth:`Reconciler._observe` would show."""
        ids = _instances_to_observe(job)
        volume_id = _volume_to_observe(job)
        return Observed(
            instances={iid: self.instances[iid] for iid in ids},
            volume=self.volumes[volume_id] if volume_id is not None else None,
        )


class SweepOutcome(NamedTuple):
    visited: int
    failed: int
    named: frozenset[str] = frozenset()  # instances the records it read name


@dataclass
class Reconciler:
    """Runs passes of the control loop: one job (``reconcile``) or all live ones (``sweep``)."""

    store: JobStore
    ec2: Ec2Gateway
    launch_settings: Callable[[], LaunchSettings]
    render_user_data: Callable[[Job, Attempt], str]
    clock: Callable[[], float]
    fleet: FleetRecords | None = None  # None: each job plans on its own record alone
    bucket: str = ""  # the stage's results bucket, for records that predate results_uri
    max_passes: int = 4
    calls: list[str] = field(default_factory=list)  # what the last pass did (for tests/bench)

    def reconcile(self, job_id: str, signal: Callable[[Job, float], Job] | None = None) -> Job:
        """Bring ``job_id`` one step closer to its goal; safe to call any time, repeatedly."""
        for _ in range(self.max_passes - 1):
            try:
                return self._pass(job_id, signal)
            except ConcurrentUpdate:
                logger.info("job written concurrently; reading again", extra={"job_id": job_id})
        return self._pass(job_id, signal)

    def _pass(self, job_id: str, signal: Callable[[Job, float], Job] | None) -> Job:
        self.calls = []
        return self._pass_on(
            self.store.get(job_id), signal, self._observe, self._prices, self.fleet_records
        )

    def _pass_on(
        self,
        stored: Job,
        signal: Callable[[Job, float], Job] | None,
        observe: Callable[[Job], Observed],
        prices: Callable[[Job, float], Mapping[Pool, float]],
        fleet: Callable[[Job, Mapping[Pool, float], float], FleetView],
        sweeping: bool = False,
    ) -> Job:
        read = saved = stored
        now = self.clock()
        try:
            job = signal(stored, now) if signal is not None else stored
            if job.results_uri is None and self.bucket and job.spec.results_s3_uri is None:
                # Stored before jobs kept it: where runtime.s3_prefix_for sends its syncs.
                job = job.model_copy(
                    update={"results_uri": f"s3://{self.bucket}/jobs/{job.job_id}"}
                )
            # Look up only what decide asks for: a recovery needs prices, not a describe.
            observed = Observed()
            decision = decide(job, observed, now, sweeping)
            if decision.needs_observation:
                observed = observe(job)
                decision = decide(job, observed, now, sweeping)
            if decision.needs_prices:
                found = prices(job, now)
                observed = replace(observed, prices=found, fleet=fleet(job, found, now))
                decision = decide(job, observed, now, sweeping)
            job = decision.job

            new_instances: list[tuple[str, int]] = []
            # Instances that must go, first: a write-ahead below may end their attempts
            # in the record, after which no pass would look at them again, so a
            # terminate that failed then would leave one running (a stopped one holding
            # the volume). Terminating twice is harmless.
            for terminate in [a for a in decision.actions if isinstance(a, Terminate)]:
                job = self._run(terminate, job, now, new_instances)

            written_ahead = (Launch, CreateSnapshot, LeaveOnDemand)
            if any(isinstance(a, written_ahead) for a in decision.actions) and job != stored:
                # Write ahead: the attempt (or move) exists before the instance (or snapshot).
                job = self._save(job, now)
                stored = saved = job

            for action in decision.actions:
                if isinstance(action, Terminate):
                    continue
                if job.state.is_terminal() and not decision.job.state.is_terminal():
                    break  # an action ended the job (it failed clearly): launch nothing more
                job = self._run(action, job, now, new_instances)

            if job != stored or new_instances:
                try:
                    job = self._save(job, now, new_instances)
                except ConcurrentUpdate:
                    self._end_unrecorded(job.job_id, new_instances)
                    raise
                saved = job
        finally:
            # What this pass wrote, even when a later step failed: the next pass reads
            # it as known and would not share it.
            self.record_capacity(read, saved, now)
        metrics.publish(job.job_id, metrics.pass_metrics(read, job, now))
        return job

    def record_capacity(self, read: Job, saved: Job, now: float) -> None:
        """Share in the fleet records what the record ``saved`` says about spot capacity
        that ``read`` did not."""
        if self.fleet is not None and saved is not read:
            self.share_capacity(placement.new_observations(read, saved), now)

    def share_capacity(
        self, found: Mapping[Pool, Sequence[placement.CapacityObservation]], now: float
    ) -> None:
        """Add ``found`` to the pools' fleet records. Never fails the caller: the jobs'
        own records keep the facts, only other jobs plan without them."""
        if self.fleet is None or not found:
            return
        self.calls += ["dynamodb:WritePool"] * len(found)
        try:
            self.fleet.record(found, now)
        except Exception:
            logger.warning(
                "could not record capacity observations",
                extra={
                    "pools": sorted(map(str, found)),
                    "job_ids": sorted({o.job_id for seen in found.values() for o in seen}),
                },
                exc_info=True,
            )

    def fleet_records(self, job: Job, prices: Mapping[Pool, float], now: float) -> FleetView:
        """The fleet records of the pools the job may be offered, None when unknown
        (no fleet records here, or the read failed: the job's own record alone)."""
        if self.fleet is None:
            return None
        self.calls.append("dynamodb:ReadPools")
        try:
            return self.fleet.read(_pools_offered(job, prices, now))
        except Exception:
            logger.warning(
                "could not read the pools' fleet records",
                extra={"job_id": job.job_id},
                exc_info=True,
            )
            return None

    def _end_unrecorded(self, job_id: str, launched: Sequence[tuple[str, int]]) -> None:
        """Terminate what this pass launched if the record that beat its write does not
        name it: another pass launched another candidate of the same attempt first.

        Only this pass knows the instance, and a pass can adopt a launch only into an
        attempt without an instance, which the winning write has filled; so no record
        will ever name it. It never had the job's volume (attaching is a later pass's,
        for the recorded instance), so ending it loses nothing.
        """
        if not launched:
            return
        self.calls.append("dynamodb:Read")
        named = {a.instance_id for a in self.store.get(job_id).attempts}
        extras = [iid for iid, _ in launched if iid not in named]
        if extras:
            self.calls.append("ec2:TerminateInstances")
            self.ec2.terminate(extras)
            logger.info(
                "terminated a launch another pass's write made redundant",
                extra={"job_id": job_id, "instance_ids": extras},
            )

    def sweep(self, job_ids: Iterable[str]) -> SweepOutcome:
        """Reconcile every job in ``job_ids``, observing them all with a few calls.

        One paginated DescribeInstances and one DescribeVolumes for all the jobs (not
        two calls per job, which at 1,000 jobs would outrun EC2's describe refill of 20
        per second), spot prices once per instance types and zones; then each job is
        decided on its slice of that observation and written on the version read. A
        job written meanwhile (an event's pass) is reconciled again on its own, with
        its own describes. A failure costs only that job its turn.
        """
        self.calls = []
        stored: list[Job] = []
        visited = failed = 0
        for job_id in job_ids:
            visited += 1
            try:
                stored.append(self.store.get(job_id))
            except Exception:
                failed += 1
                logger.exception("sweep could not read job", extra={"job_id": job_id})
        if not stored:
            return SweepOutcome(visited, failed)
        named = frozenset(a.instance_id for job in stored for a in job.attempts if a.instance_id)
        # Read first, observe after: whatever a record names already exists in EC2.
        try:
            observation = self._observe_many(stored)
        except Exception:
            # The next sweep (a minute later) or an event carries on.
            logger.exception("sweep could not observe its jobs", extra={"jobs": len(stored)})
            return SweepOutcome(visited, visited, named)
        sweep_calls = self.calls
        prices: dict[tuple[tuple[str, ...], tuple[str, ...] | None], Mapping[Pool, float]] = {}

        def prices_once(job: Job, now: float) -> Mapping[Pool, float]:
            zones = _price_zones(job, now)
            key = (tuple(job.spec.instance_types), None if zones is None else tuple(zones))
            if key not in prices:
                prices[key] = self._prices(job, now)
            return prices[key]

        fleets: dict[frozenset[Pool], FleetView] = {}

        def fleet_once(job: Job, found: Mapping[Pool, float], now: float) -> FleetView:
            key = _pools_offered(job, found, now)
            if key not in fleets:
                fleets[key] = self.fleet_records(job, found, now)
            return fleets[key]

        for index, job in enumerate(stored):
            if self.clock() - observation.at > SWEEP_OBSERVATION_MAX_AGE_SECONDS:
                # A long sweep (throttled calls back off) acts on what EC2 shows now.
                self.calls = []
                try:
                    observation = self._observe_many(stored[index:])
                except Exception:
                    logger.exception("sweep could not observe its jobs again")
                    return SweepOutcome(visited, failed + len(stored) - index, named)
                finally:
                    sweep_calls += self.calls
            self.calls = []
            # A job moving its volume needs its snapshot and restored volume looked
            # at too: its own describes (moves are rare; the batch stays as it is).
            observe = self._observe if job.move is not None else observation.slice
            try:
                try:
                    self._pass_on(job, None, observe, prices_once, fleet_once, sweeping=True)
                except ConcurrentUpdate:
                    # Written since the sweep read it: its own pass observes it afresh.
                    sweep_calls += self.calls
                    self.reconcile(job.job_id)
            except Exception:
                failed += 1
                logger.exception("sweep could not reconcile job", extra={"job_id": job.job_id})
            sweep_calls += self.calls
        self.calls = sweep_calls
        return SweepOutcome(visited, failed, named)

    def reap_unrecorded(
        self, known: Collection[str] = (), older_than_seconds: float = ORPHAN_AFTER_SECONDS
    ) -> list[str]:
        """Terminate spotctl instances no record names, once older than
        ``older_than_seconds``: a batch's that no job took (its handler died between
        launching and handing out, and the delivery was never retried), or one a pass
        launched before losing a race and dying before it could end it. Safe to run any
        time: an instance in the instance index (written in the transaction that names
        it in a job) is a job's and is never touched, nor is one in ``known`` (named by
        the records the sweep has just read; spares their reads). Such an instance never
        had a job's volume: only a recorded one is attached."""
        now = self.clock()
        orphans = [
            instance_id
            for instance_id, launched in self.ec2.live_instances_tagged(JOB_TAG).items()
            if now - launched.timestamp() > older_than_seconds
            and instance_id not in known
            and self.store.job_id_for_instance(instance_id) is None
        ]
        if orphans:
            self.ec2.terminate(orphans)
            logger.warning("terminated instances no record names", extra={"ids": orphans})
        return orphans

    def _save(self, job: Job, now: float, new_instances: Sequence[tuple[str, int]] = ()) -> Job:
        self.calls.append("dynamodb:Write")
        return self.store.save(job.model_copy(update={"updated_at": now}), new_instances)

    def _observe(self, job: Job) -> Observed:
        ids = _instances_to_observe(job)
        instances = {}
        if ids:
            self.calls.append("ec2:DescribeInstances")
            instances = self.ec2.describe_instances(ids)
        volume_id = _volume_to_observe(job)
        volume = None
        if volume_id is not None:
            self.calls.append("ec2:DescribeVolumes")
            volume = self.ec2.describe_volume(volume_id)
        snapshot = moved_volume = None
        move = job.move
        if move is not None and move.snapshot_id is not None:
            self.calls.append("ec2:DescribeSnapshots")
            snapshot = self.ec2.describe_snapshot(move.snapshot_id)
        if move is not None and move.volume_id is not None:
            self.calls.append("ec2:DescribeVolumes")
            moved_volume = self.ec2.describe_volume(move.volume_id)
        return Observed(
            instances=instances, volume=volume, snapshot=snapshot, moved_volume=moved_volume
        )

    def _observe_many(self, jobs: Sequence[Job]) -> SweepObservation:
        at = self.clock()
        instance_ids = {iid for job in jobs for iid in _instances_to_observe(job)}
        volume_ids = {vid for job in jobs if (vid := _volume_to_observe(job)) is not None}
        instances: dict[str, InstanceView] = {}
        volumes: dict[str, VolumeView] = {}
        if instance_ids:
            self.calls.append("ec2:DescribeInstances")
            instances = self.ec2.describe_instances_of_jobs(instance_ids)
        if volume_ids:
            self.calls.append("ec2:DescribeVolumes")
            volumes = self.ec2.describe_volumes_of_jobs(volume_ids)
        return SweepObservation(instances, volumes, at)

    def _prices(self, job: Job, now: float) -> dict[Pool, float]:
        zones = _price_zones(job, now)
        self.calls.append("ec2:DescribeSpotPriceHistory")
        return self.ec2.spot_prices(job.spec.instance_types, zones, now)

    def _run(self, action: Action, job: Job, now: float, new: list[tuple[str, int]]) -> Job:
        log = {"job_id": job.job_id, "action": type(action).__name__}
        if isinstance(action, CreateVolume):
            self.calls.append("ec2:CreateVolume")
            tags = {"spotctl:job-id": job.job_id, "Name": f"spotctl-{job.spec.name}"}
            try:
                volume_id = self.ec2.create_volume(
                    action.az, action.size_gib, action.snapshot_id, action.client_token, tags
                )
            except (Ec2Failure, ResourceMissing) as exc:
                if action.for_move:
                    return apply_move_failed(job, f"CreateVolume: {exc}", now)
                if isinstance(exc, Ec2Failure) and exc.transient:
                    raise
                # A snapshot that does not exist (or is too big, or whose key we may not
                # use) will not create a volume on the next pass either.
                if job.current is not None and not job.current.ended:
                    job = _end_attempt(job, job.current, ENDED_LAUNCH_FAILED, now)
                return _fail(job, now, f"its volume could not be created: {exc}")
            logger.info("volume created", extra={**log, "volume_id": volume_id})
            if action.for_move:
                return apply_moved_volume_created(job, volume_id, now)
            return apply_volume_created(job, action, volume_id, now)
        if isinstance(action, CreateSnapshot):
            return self._snapshot(job, action, now)
        if isinstance(action, Launch):
            if action.replay:
                adopted = self._adopt_launched(job, action.attempt, now, new)
                if adopted is not None:
                    return adopted
            return self._launch(job, action.attempt, now, new)
        if isinstance(action, TerminateLaunched):
            for number in action.attempts:
                self.calls.append("ec2:DescribeInstances")
                orphans = self.ec2.launched_for(job.job_id, number)
                if orphans:
                    self.calls.append("ec2:TerminateInstances")
                    self.ec2.terminate(orphans)
                    logger.info("terminated unrecorded", extra={**log, "instance_ids": [*orphans]})
            return job
        if isinstance(action, AttachVolume):
            self.calls.append("ec2:AttachVolume")
            try:
                self.ec2.attach_volume(action.volume_id, action.instance_id)
            except (VolumeBusy, ResourceMissing) as exc:
                # The next event or the sweep tries again; nothing to undo.
                logger.info("attach deferred", extra={**log, "reason": str(exc)})
                return job
            except Ec2Failure as exc:
                if exc.transient:
                    raise
                # The device name taken by the image, the instance's limit on volumes:
                # no later try does better. The instance goes; the job says why.
                self.calls.append("ec2:TerminateInstances")
                self.ec2.terminate((action.instance_id,))
                for attempt in job.attempts:
                    if attempt.instance_id == action.instance_id and not attempt.ended:
                        job = _end_attempt(job, attempt, ENDED_LAUNCH_FAILED, now)
                why = f"its volume could not be attached to {action.instance_id}: {exc}"
                return _fail(job, now, why)
            logger.info("volume attached", extra={**log, "instance_id": action.instance_id})
            return apply_attached(job, action, now)
        if isinstance(action, Terminate):
            self.calls.append("ec2:TerminateInstances")
            self.ec2.terminate(action.instance_ids)
            logger.info("terminated", extra={**log, "instance_ids": list(action.instance_ids)})
            return job
        if isinstance(action, LeaveOnDemand):
            self.calls.append("ec2:CreateTags")
            self.ec2.ask_to_leave(action.instance_id, iso(now) or "")
            logger.info("asked to leave", extra={**log, "instance_id": action.instance_id})
            return apply_leave_asked(job, action, now)
        self.calls.append("ec2:DeleteVolume")
        try:
            self.ec2.delete_volume(action.volume_id)
        except (Ec2Failure, ResourceMissing) as exc:
            if isinstance(exc, Ec2Failure) and exc.transient:
                raise
            # The job is cancelled either way; the volume stays, and the user is told.
            timeline = tuple(e for e in job.timeline if e.kind != "volume-deleted")
            job = job.model_copy(update={"timeline": timeline})
            return job.with_event(now, "volume-kept", f"DeleteVolume: {exc}")
        return job

    def _snapshot(self, job: Job, action: CreateSnapshot, now: float) -> Job:
        if action.replay:
            self.calls.append("ec2:DescribeSnapshots")
            found = self.ec2.snapshot_of_move(job.job_id, action.move)
            if found is not None:
                job = apply_snapshot_started(job, found, now)
                return job.with_event(now, "snapshot-adopted", f"{found}, found by its tags")
        self.calls.append("ec2:CreateSnapshot")
        tags = {
            "spotctl:job-id": job.job_id,
            "spotctl:move": str(action.move),
            "Name": f"spotctl-{job.spec.name}-move-{action.move}",
        }
        try:
            snapshot_id = self.ec2.create_snapshot(action.volume_id, tags)
        except (Ec2Failure, ResourceMissing, VolumeBusy) as exc:
            return apply_move_failed(job, f"CreateSnapshot: {exc}", now)
        logger.info("snapshot started", extra={"job_id": job.job_id, "snapshot_id": snapshot_id})
        return apply_snapshot_started(job, snapshot_id, now)

    def _adopt_launched(
        self, job: Job, number: int, now: float, new: list[tuple[str, int]]
    ) -> Job | None:
        """Record what a dead pass launched for attempt ``number``, if anything.

        Candidate 1's ClientToken protects only candidate 1: a pass that died after
        launching it, with candidate 0 refused, would otherwise retry candidate 0 (which
        may have capacity by now) and leave two instances. So the replay first looks
        for the attempt's tagged instances and keeps the one it finds (extras, which a
        single pass never makes, are terminated).
        """
        attempt = job.attempt(number)
        assert attempt is not None
        self.calls.append("ec2:DescribeInstances")
        launched = self.ec2.launched_for(job.job_id, number)
        if not launched:
            return None
        pools = [(c.pool.instance_type, c.pool.az) for c in attempt.candidates]
        ours = sorted((pools.index(pool), iid) for iid, pool in launched.items() if pool in pools)
        kept = ours[0][1] if ours else None
        extras = [iid for iid in launched if iid != kept]
        if extras:
            # Only concurrent passes that each launched a different candidate get here.
            self.calls.append("ec2:TerminateInstances")
            self.ec2.terminate(extras)
        if not ours:
            return None
        index, keep = ours[0]
        new.append((keep, number))
        job = apply_launched(job, number, index, keep, now)
        return job.with_event(now, "launch-adopted", f"{keep}, found by its tags", number)

    def _launch(self, job: Job, number: int, now: float, new: list[tuple[str, int]]) -> Job:
        attempt = job.attempt(number)
        assert attempt is not None
        settings = self.launch_settings()
        try:
            user_data = self.render_user_data(job, attempt)
        except ValueError as exc:
            # Submission refuses what cannot render; a job stored before that check,
            # or one the agent's files outgrew since, fails clearly, not every pass.
            job = _end_attempt(job, attempt, ENDED_LAUNCH_FAILED, now)
            return _fail(job, now, f"its instance's user data cannot be made: {exc}")
        errors: list[str] = []
        for index, candidate in enumerate(attempt.candidates):
            tags = {
                "spotctl:job-id": job.job_id,
                "spotctl:attempt": str(number),
                "Name": f"spotctl-{job.spec.name}-{number}",
            }
            self.calls.append("ec2:RunInstances")
            try:
                instance_id = self.ec2.run_instance(candidate, settings, user_data, tags)
            except (InsufficientCapacity, SpotPriceTooLow, Ec2Failure) as exc:
                if isinstance(exc, Ec2Failure) and exc.transient:
                    raise
                # This pool will not do (no capacity, or a type the AMI or account
                # cannot run there): try the next; none left, the job waits and says why.
                errors.append(f"{candidate.pool}: {exc}")
                job = job.with_event(now, "launch-refused", f"{candidate.pool}: {exc}", number)
                continue
            new.append((instance_id, number))
            logger.info(
                "launched",
                extra={
                    "job_id": job.job_id,
                    "instance_id": instance_id,
                    "pool": str(candidate.pool),
                },
            )
            return apply_launched(job, number, index, instance_id, now)
        return apply_launch_failed(job, number, errors, now)
