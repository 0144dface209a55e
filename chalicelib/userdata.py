"""The user data of a spotctl instance, rendered from the files in user_data/.

user_data/cloud-init.sh is the template. Its single-quoted slots receive the job's
parameters (base64 of JSON), or for a batch the member table (base85 of zlib of a JSON
list of parameter documents), and the instance side, bootstrap.sh and agent.py (base85
of bzip2 of JSON {file name: text}); neither alphabet has a quote, so no job value is
ever parsed by a shell. The files are read from chalicelib/user_data/: symlinks to the
top-level user_data/ in the repository, real files inside the Lambda package.

A batch (chalicelib.batch: one RunInstances, MinCount=1, MaxCount=N) gives every
instance the same user data, so it carries the ordered member table: entry i is the job
of the instance whose ``ami-launch-index`` is i. bootstrap.sh reads that index from
IMDS and keeps only its entry (``agent.py pick-member``). The table is compressed: the
template and the scripts take ~13.1 KB of the 16 KB (they ship without their
comments: :func:`shipped`), and a member adds ~0.1-0.5 KB (its secret, ids and prefix
barely compress; what members share does), so a request holds a few dozen members at
most; :func:`members_that_fit` says how many.
"""

from __future__ import annotations

import base64
import bz2
import io
import json
import re
import signal
import tokenize
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

USER_DATA_LIMIT_BYTES = 16 * 1024  # EC2's limit on raw (not yet base64) user data
FILES_DIR = Path(__file__).parent / "user_data"
BUNDLED_FILES = ("bootstrap.sh", "agent.py")
_PARAMS_SLOT = "SPOTCTL_PARAMS_B64=''"
_BUNDLE_SLOT = "SPOTCTL_BUNDLE_B85=''"
_MEMBERS_SLOT = "SPOTCTL_MEMBERS_B85=''"
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
    env: tuple[tuple[str, str], ...] = ()  # the workload's variables, in the spec's order


def shipped(name: str, text: str) -> str:
    """The file as the instance gets it: without its comments (16 KB is tight), line
    for line, so that a traceback's (or bash's) line numbers are the repository's.
    Docstrings stay; the shebang too. In a shell script only whole-line comments go
    (a ``#`` inside a line may be ``$#`` or ``${x#y}``; the script has no here-document)."""
    lines = text.splitlines(keepends=True)
    if name.endswith(".sh"):
        if "<<" in text:  # a here-document's lines are data, not comments
            raise RuntimeError(f"{name}: a here-document would lose its '#' lines")
        return "".join(
            "\n"
            if line.lstrip().startswith("#") and not (row == 0 and line.startswith("#!"))
            else line
            for row, line in enumerate(lines)
        )
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        row, column = token.start
        if token.type == tokenize.COMMENT and not (row == 1 and token.string.startswith("#!")):
            kept = lines[row - 1][:column].rstrip()
            lines[row - 1] = kept + "\n"
    return "".join(lines)


@cache
def _template() -> tuple[str, str]:
    """The user data template and the encoded bundle; both depend on the files only."""
    # Its comments go too: what they say is in the repository, and 16 KB is tight.
    template = shipped("cloud-init.sh", (FILES_DIR / "cloud-init.sh").read_text(encoding="utf-8"))
    for slot in (_PARAMS_SLOT, _MEMBERS_SLOT, _BUNDLE_SLOT):
        if template.splitlines().count(slot) != 1:
            raise RuntimeError(f"cloud-init.sh must hold the line {slot!r} exactly once")
    files = {
        name: shipped(name, (FILES_DIR / name).read_text(encoding="utf-8"))
        for name in BUNDLED_FILES
    }
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
    doc["env"] = dict(params.env)
    doc["stop_signal"] = params.stop_signal.removeprefix("SIG")
    return doc


def _document_json(params: AgentParams) -> str:
    return json.dumps(params_document(params), separators=(",", ":"), sort_keys=True)


def _fill(slot: str, value: str, template: str) -> str:
    return template.replace(slot, f"{slot[:-2]}'{value}'", 1)


class UserDataTooLarge(ValueError):
    """The rendered user data is over EC2's limit (the job's command is what varies)."""


def _checked(text: str) -> str:
    size = len(text.encode("utf-8"))
    if size > USER_DATA_LIMIT_BYTES:
        raise UserDataTooLarge(
            f"user data is {size} bytes, over EC2's {USER_DATA_LIMIT_BYTES}; "
            "shorten the command or move it into the image"
        )
    return text


def render_user_data(params: AgentParams) -> str:
    """The full user data for one attempt of a job; ValueError if invalid or over 16 KB."""
    validate(params)
    template, bundle_b85 = _template()
    params_b64 = base64.b64encode(_document_json(params).encode("utf-8")).decode("ascii")
    text = _fill(_PARAMS_SLOT, params_b64, template)
    return _checked(_fill(_BUNDLE_SLOT, bundle_b85, text))


def _unchecked_batch(members: Sequence[AgentParams]) -> str:
    template, bundle_b85 = _template()
    table = "[" + ",".join(_document_json(m) for m in members) + "]"
    members_b85 = base64.b85encode(zlib.compress(table.encode("utf-8"), 9)).decode("ascii")
    text = _fill(_MEMBERS_SLOT, members_b85, template)
    return _fill(_BUNDLE_SLOT, bundle_b85, text)


def render_batch_user_data(members: Sequence[AgentParams]) -> str:
    """The user data shared by the instances of one batch request: member i is the job of
    the instance with ``ami-launch-index`` i. ValueError if a member is invalid, the
    table is empty, or it is over 16 KB (see :func:`members_that_fit`)."""
    if not members:
        raise ValueError("a batch needs at least one member")
    for params in members:
        validate(params)
    return _checked(_unchecked_batch(members))


def batch_user_data_size(members: Sequence[AgentParams]) -> int:
    return len(_unchecked_batch(members).encode("utf-8"))


def members_that_fit(members: Sequence[AgentParams], limit: int = USER_DATA_LIMIT_BYTES) -> int:
    """How many of ``members``, from the first, one batch user data can carry (0 when
    not even the first fits). Compressed sizes are not additive, so this renders."""
    count = 0
    while count < len(members) and batch_user_data_size(members[: count + 1]) <= limit:
        count += 1
    return count
