"""Rendering the user data: size, safety of the embedding, and what runs on Python 3.9."""

from __future__ import annotations

import ast
import base64
import bz2
import importlib.util
import io
import json
import re
import secrets
import subprocess
import sys
import tokenize
import zlib
from pathlib import Path
from types import ModuleType

import pytest

from chalicelib.userdata import (
    USER_DATA_LIMIT_BYTES,
    AgentParams,
    batch_user_data_size,
    members_that_fit,
    params_document,
    render_batch_user_data,
    render_user_data,
    shipped,
)

REPO = Path(__file__).resolve().parents[2]
TYPICAL = AgentParams(
    job_id="01JF6Z8Y3V6Q2W9R1T5M4K7N8P",
    attempt=3,
    api_url="https://abcdefghij.execute-api.us-east-1.amazonaws.com/api",
    secret="x" * 64,
    volume_id="vol-0123456789abcdef0",
    command=("torchrun", "--nproc-per-node=8", "train.py", "--config", "configs/llm-7b.yaml"),
    image="123456789012.dkr.ecr.us-east-1.amazonaws.com/train:2026-11-28",
    s3_prefix="s3://research-checkpoints/jobs/01JF6Z8Y3V6Q2W9R1T5M4K7N8P",
)


def slot(text: str, name: str) -> str:
    match = re.search(rf"^{name}='([^']*)'$", text, re.MULTILINE)
    assert match, name
    return match[1]


def load_agent() -> ModuleType:
    spec = importlib.util.spec_from_file_location("spotctl_agent", REPO / "user_data/agent.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["spotctl_agent"] = module
    spec.loader.exec_module(module)
    return module


def test_typical_user_data_is_well_under_the_16_kb_limit() -> None:
    size = len(render_user_data(TYPICAL).encode())
    print(f"rendered user data: {size} bytes")
    assert size < USER_DATA_LIMIT_BYTES - 2048  # room for long commands


def storm_member(n: int) -> AgentParams:
    """A typical job of a storm: its own id, secret, volume and prefix; the rest shared."""
    job_id = f"01JF6Z8Y3V6Q2W9R1T{n:08d}"
    return AgentParams(
        **{
            **TYPICAL.__dict__,
            "job_id": job_id,
            "secret": secrets.token_hex(32),
            "volume_id": f"vol-0{secrets.token_hex(8)}",
            "s3_prefix": f"s3://research-checkpoints/jobs/{job_id}",
        }
    )


def test_batch_member_table_round_trips_in_launch_index_order() -> None:
    members = [storm_member(n) for n in range(3)]
    text = render_batch_user_data(members)
    assert slot(text, "SPOTCTL_PARAMS_B64") == ""
    table = json.loads(zlib.decompress(base64.b85decode(slot(text, "SPOTCTL_MEMBERS_B85"))))
    assert table == [params_document(m) for m in members]


def test_batch_requests_are_capped_by_the_rendered_size() -> None:
    members = [storm_member(n) for n in range(100)]
    fit = members_that_fit(members)
    sizes = {n: batch_user_data_size(members[:n]) for n in (1, fit, fit + 1)}
    print(f"batch user data: {sizes} bytes; {fit} typical members per request")
    assert 10 <= fit < 100  # the scripts take ~11.7 KB; a member ~0.15 KB compressed
    assert len(render_batch_user_data(members[:fit]).encode()) <= USER_DATA_LIMIT_BYTES
    assert sizes[fit + 1] > USER_DATA_LIMIT_BYTES
    with pytest.raises(ValueError, match="over EC2's 16384"):
        render_batch_user_data(members[: fit + 1])
    # A member too large for any batch fits none; the one-job path takes it.
    noise = secrets.token_urlsafe(6000)  # incompressible
    huge = AgentParams(**{**TYPICAL.__dict__, "command": ("python", "-c", noise)})
    assert members_that_fit([huge, *members]) == 0
    assert members_that_fit(members, limit=batch_user_data_size(members[:5])) == 5


def test_a_batch_with_an_unusable_member_is_refused() -> None:
    bad = AgentParams(**{**TYPICAL.__dict__, "volume_id": "/dev/sdf"})
    with pytest.raises(ValueError, match="volume_id"):
        render_batch_user_data([storm_member(1), bad])
    with pytest.raises(ValueError, match="at least one member"):
        render_batch_user_data([])


def test_user_data_over_16_kb_is_refused() -> None:
    huge = AgentParams(**{**TYPICAL.__dict__, "command": ("python", "-c", "x" * 8000)})
    with pytest.raises(ValueError, match="over EC2's 16384"):
        render_user_data(huge)


@pytest.mark.parametrize(
    "change",
    [
        {"volume_id": "/dev/sdf"},
        {"api_url": "https://api.example/"},
        {"stop_signal": "KILL"},
        {"stop_signal": "NOPE"},
        {"checkpoint_dir": "/etc"},
        {"checkpoint_dir": "../other-job"},
        {"s3_prefix": "bucket/prefix"},
        {"command": (), "image": None},
    ],
)
def test_parameters_the_instance_cannot_use_are_refused(change: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        render_user_data(AgentParams(**{**TYPICAL.__dict__, **change}))


def test_parameters_and_files_round_trip_through_the_shell_slots() -> None:
    hostile = AgentParams(
        **{
            **TYPICAL.__dict__,
            "command": ("sh", "-c", "echo '$(id)' `id`; x=\"$HOME\"\n"),
            "env": (("NCCL_DEBUG", "INFO"), ("ARGS", "--lr '$(id)' \"x\"\n`id`")),
        }
    )
    text = render_user_data(hostile)
    # The template ships without its comments too; its lines are otherwise its own.
    template = (REPO / "user_data" / "cloud-init.sh").read_text().splitlines()
    assert [line for line in text.splitlines() if line.startswith("#")] == ["#!/bin/bash"]
    assert len(text.splitlines()) == len(template) and template[1].startswith("# ")
    doc = json.loads(base64.b64decode(slot(text, "SPOTCTL_PARAMS_B64")))
    assert doc == params_document(hostile)
    files = json.loads(bz2.decompress(base64.b85decode(slot(text, "SPOTCTL_BUNDLE_B85"))))
    for name in ("bootstrap.sh", "agent.py"):
        assert files[name] == shipped(name, (REPO / "user_data" / name).read_text())
    # The script ships without its whole-line comments, line for line (bash's line
    # numbers are the repository's); every other line as it is.
    original = (REPO / "user_data" / "bootstrap.sh").read_text().splitlines()
    sent = files["bootstrap.sh"].splitlines()
    assert len(sent) == len(original) and sent[0] == original[0] == "#!/bin/bash"
    for line, was in zip(sent[1:], original[1:], strict=True):
        assert line == ("" if was.lstrip().startswith("#") else was)
    assert sum(1 for was in original if was.lstrip().startswith("#")) > 10
    # The agent reads exactly what was rendered.
    agent = load_agent()
    path = Path(__file__).parent / "params.tmp.json"
    try:
        path.write_text(json.dumps(doc))
        params = agent.Params.load(str(path))
    finally:
        path.unlink()
    assert params.command == hostile.command
    assert params.secret == hostile.secret
    assert params.env == dict(hostile.env)


def test_the_shipped_agent_is_the_repositorys_without_comments_line_for_line() -> None:
    original = (REPO / "user_data/agent.py").read_text()
    sent = shipped("agent.py", original)
    assert len(sent) < len(original) - 500  # what the 16 KB gains
    assert ast.dump(ast.parse(sent)) == ast.dump(ast.parse(original))  # the same program
    assert sent.count("\n") == original.count("\n")  # tracebacks keep their line numbers
    assert sent.splitlines()[0] == "#!/usr/bin/env python3"
    comments = [
        t.string
        for t in tokenize.generate_tokens(io.StringIO(sent).readline)
        if t.type == tokenize.COMMENT
    ]
    assert comments == ["#!/usr/bin/env python3"]


def test_the_instance_side_parses_as_python_3_9() -> None:
    """Amazon Linux 2023's python3 is 3.9: no 3.10+ syntax may creep in."""
    sources = [(REPO / "user_data/agent.py").read_text()]
    for script in ("cloud-init.sh", "bootstrap.sh"):
        text = (REPO / "user_data" / script).read_text()
        sources += re.findall(r"-c '\n(.*?)\n'", text, re.DOTALL)
    assert len(sources) == 2  # the agent and cloud-init.sh's unpacker
    for source in sources:
        ast.parse(source, feature_version=(3, 9))


def test_the_scripts_are_shellcheck_clean() -> None:
    scripts = sorted(str(p) for p in (REPO / "user_data").glob("*.sh"))
    shellcheck = Path(sys.executable).parent / "shellcheck"
    done = subprocess.run([str(shellcheck), *scripts], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout


def test_the_unrendered_template_refuses_to_run(tmp_path: Path) -> None:
    done = subprocess.run(
        ["bash", str(REPO / "user_data/cloud-init.sh")],
        capture_output=True,
        text=True,
        check=False,
        env={"SPOTCTL_STATE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 1
    assert "template" in done.stderr


def test_a_shell_script_with_a_here_document_is_not_shipped() -> None:
    """Its '#' lines would be data, which comment stripping would drop."""
    with pytest.raises(RuntimeError, match="here-document"):
        shipped("x.sh", "#!/bin/bash\ncat <<EOF\n# data, not a comment\nEOF\n")
