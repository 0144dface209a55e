"""The user data of a spotctl instance, rendered from the files in user_data/.

user_data/cloud-init.sh is the template. Its two single-quoted slots receive the job's
parameters (base64 of JSON) and the instance side, bootstrap.sh and agent.py (base85 of
bzip2 of JSON {file name: text}); neither alphabet has a quote, so no job value is ever
parsed by a shell. The files are read from chalicelib/user_data/: symlinks to the
top-level user_data/ in the repository, real files inside the Lambda package.
"""

from __future__ import annotations

import base64
import bz2
import json
import re
import signal
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

USER_DATA_LIMIT_BYTES = 16 * 1024  # EC2's limit on raw (not yet base64) user data
FILES_DIR = Path(__file__).parent / "user_data"
BUNDLED_FILES = ("bootstrap.sh", "agent.py")
_PARAMS_SLOT = "SPOTCTL_PARAMS_B64=''"
_BUNDLE_SLOT = "SPOTCTL_BUNDLE_B85=''"
_VOLUME_ID = re.compile(r"vol-[0-9a-f]+")


@dataclass(frozen=True)
class AgentParams:
    """What the instance needs to know about the job and its attempt."""

    job_id: str
    attempt: int
    api_url: str  # base URL of the spotctl API, no trailing slash
    secret: str  # per-job secret; the agent sends "Authorization: Bearer <secret>"
    volume_id: str  # e.g. "vol-0abc..."
    command: tuple[str, ...]  # argv, exec'd without any shell evaluation
    image: str | None = None
    s3_prefix: str | None = None  # "s3://bucket/prefix" where checkpoints/results go
    checkpoint_dir: str = "checkpoints"  # relative to the mount point
    grace_seconds: int = 90
    stop_signal: str = "TERM"
    sync_interval_seconds: int = 1800


@cache
def _template() -> tuple[str, str]:
    """The user data template and the encoded bundle; both depend on the files only."""
    template = (FILES_DIR / "cloud-init.sh").read_text(encoding="utf-8")
    for slot in (_PARAMS_SLOT, _BUNDLE_SLOT):
        if template.splitlines().count(slot) != 1:
            raise RuntimeError(f"cloud-init.sh must hold the line {slot!r} exactly once")
    files = {name: (FILES_DIR / name).read_text(encoding="utf-8") for name in BUNDLED_FILES}
    bundle = bz2.compress(json.dumps(files).encode("utf-8"), 9)
    return template, base64.b85encode(bundle).decode("ascii")


def validate(params: AgentParams) -> None:
    """Raise ValueError for parameters the instance could not act on."""
    problems: list[str] = []
    if not params.job_id:
        problems.append("job_id is empty")
    if params.attempt < 0:
        problems.append("attempt is negative")
    if not re.fullmatch(r"https?://[^\s]+", params.api_url) or params.api_url.endswith("/"):
        problems.append("api_url must be http(s)://... without a trailing slash")
    if not _VOLUME_ID.fullmatch(params.volume_id):
        problems.append(f"volume_id {params.volume_id!r} is not vol-<hex>")
    if not params.command and not params.image:
        problems.append("a job needs a command, an image, or both")
    if params.s3_prefix is not None and not params.s3_prefix.startswith("s3://"):
        problems.append("s3_prefix must start with s3://")
    parts = Path(params.checkpoint_dir).parts
    if not parts or Path(params.checkpoint_dir).is_absolute() or ".." in parts:
        problems.append("checkpoint_dir must be a relative path inside the volume")
    if params.grace_seconds < 0 or params.sync_interval_seconds <= 0:
        problems.append("grace_seconds must be >= 0 and sync_interval_seconds > 0")
    signame = params.stop_signal.removeprefix("SIG")
    if f"SIG{signame}" not in signal.Signals.__members__ or signame in ("KILL", "STOP"):
        problems.append(f"stop_signal {params.stop_signal!r} is not a catchable signal name")
    if problems:
        raise ValueError("; ".join(problems))


def params_document(params: AgentParams) -> dict[str, object]:
    """The JSON document the agent reads (user_data/agent.py Params.load)."""
    doc = asdict(params)
    doc["command"] = list(params.command)
    doc["stop_signal"] = params.stop_signal.removeprefix("SIG")
    return doc


def render_user_data(params: AgentParams) -> str:
    """The full user data for one attempt of a job; ValueError if invalid or over 16 KB."""
    validate(params)
    template, bundle_b85 = _template()
    doc = json.dumps(params_document(params), separators=(",", ":"), sort_keys=True)
    params_b64 = base64.b64encode(doc.encode("utf-8")).decode("ascii")
    text = template.replace(_PARAMS_SLOT, f"SPOTCTL_PARAMS_B64='{params_b64}'", 1)
    text = text.replace(_BUNDLE_SLOT, f"SPOTCTL_BUNDLE_B85='{bundle_b85}'", 1)
    size = len(text.encode("utf-8"))
    if size > USER_DATA_LIMIT_BYTES:
        raise ValueError(
            f"user data is {size} bytes, over EC2's {USER_DATA_LIMIT_BYTES}; "
            "shorten the command or move it into the image"
        )
    return text
