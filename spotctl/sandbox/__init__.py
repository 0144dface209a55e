"""The sandbox: a local, faithful-enough AWS for spotctl (moto behind a fidelity proxy)."""

from spotctl.sandbox.clock import Clock, FakeClock, ScaledClock
from spotctl.sandbox.cloud import LocalCloud
from spotctl.sandbox.ec2 import InstanceInfo, Lifecycle, LifecycleEvent
from spotctl.sandbox.emulator import InstanceEmulator
from spotctl.sandbox.events import (
    EventBus,
    EventTarget,
    ScheduleTarget,
    schedules_from_chalice_app,
    targets_from_chalice_app,
)
from spotctl.sandbox.market import SpotMarket, SpotPool, pools_from_traces
from spotctl.sandbox.patterns import InvalidEventPattern, matches, validate_pattern
from spotctl.sandbox.traces import AvailabilityTrace, load_trace

__all__ = [
    "AvailabilityTrace",
    "Clock",
    "EventBus",
    "EventTarget",
    "FakeClock",
    "InstanceEmulator",
    "InstanceInfo",
    "InvalidEventPattern",
    "Lifecycle",
    "LifecycleEvent",
    "LocalCloud",
    "ScaledClock",
    "ScheduleTarget",
    "SpotMarket",
    "SpotPool",
    "load_trace",
    "matches",
    "pools_from_traces",
    "schedules_from_chalice_app",
    "targets_from_chalice_app",
    "validate_pattern",
]
