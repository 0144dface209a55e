"""Spot availability traces: which ticks a pool had spot capacity.

Format (the "Can't Be Late" traces): ``{"metadata": {"gap_seconds": G}, "data": [...]}``;
tick ``i`` covers ``[i*G, (i+1)*G)`` seconds from the trace start and ``data[i] == 1``
means spot was NOT available in that tick.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

# File names are ``<az>_<gpu>_<count>.json``; the instance type each GPU kind stands for.
GPU_INSTANCE_TYPES: dict[str, str] = {
    "v100_1": "p3.2xlarge",
    "v100_4": "p3.8xlarge",
    "v100_8": "p3.16xlarge",
    "k80_1": "p2.xlarge",
    "k80_8": "p2.8xlarge",
    "k80_16": "p2.16xlarge",
}

_TRACE_NAME = re.compile(r"^(?P<az>[a-z]{2}-[a-z]+-\d[a-z])_(?P<gpu>[a-z0-9]+_\d+)\.json$")


@dataclass(frozen=True)
class AvailabilityTrace:
    """A recorded availability series; past its end it repeats from the start."""

    gap_seconds: float
    unavailable: tuple[bool, ...]
    source: str = ""

    def __post_init__(self) -> None:
        if self.gap_seconds <= 0 or not self.unavailable:
            raise ValueError(f"empty or malformed trace {self.source!r}")

    def tick(self, elapsed: float) -> int:
        return int(max(elapsed, 0.0) // self.gap_seconds) % len(self.unavailable)

    def available(self, elapsed: float) -> bool:
        """Whether spot capacity exists ``elapsed`` seconds after the trace start."""
        return not self.unavailable[self.tick(elapsed)]

    def availability_share(self) -> float:
        return 1.0 - sum(self.unavailable) / len(self.unavailable)


def load_trace(path: str | Path) -> AvailabilityTrace:
    raw = json.loads(Path(path).read_text())
    gap = float(raw["metadata"]["gap_seconds"])
    data = raw["data"]
    if not all(v in (0, 1) for v in data):
        raise ValueError(f"{path}: trace values must be 0 or 1")
    return AvailabilityTrace(gap, tuple(v == 1 for v in data), source=str(path))


def parse_trace_name(path: str | Path) -> tuple[str, str]:
    """``us-west-2a_v100_1.json`` → ``("p3.2xlarge", "us-west-2a")``."""
    match = _TRACE_NAME.match(Path(path).name)
    if match is None or match["gpu"] not in GPU_INSTANCE_TYPES:
        raise ValueError(f"{path}: not a <az>_<gpu>_<count>.json trace name")
    return GPU_INSTANCE_TYPES[match["gpu"]], match["az"]
