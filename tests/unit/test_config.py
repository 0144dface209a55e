"""The stage settings spotctl derives from its configuration."""

from __future__ import annotations

import json
from pathlib import Path

from chalicelib.config import DEFAULT_AMI_PARAMETER, Config

CHALICE_CONFIG = Path(__file__).resolve().parents[2] / ".chalice" / "config.json"


def test_every_stage_uses_the_ami_whose_gpu_drivers_spotctl_knows() -> None:
    # A new default AMI must come with what it cannot drive (config.UNSUPPORTED_BY_AMI).
    stages = json.loads(CHALICE_CONFIG.read_text())["stages"]
    for name, stage in stages.items():
        env = stage["environment_variables"]
        assert env["SPOTCTL_AMI_PARAMETER"] == DEFAULT_AMI_PARAMETER, name
        config = Config.from_env({**env, "SPOTCTL_AUTH": "iam"})
        assert {"p3", "g3"} <= config.families_without_gpu_driver
        assert "g5" not in config.families_without_gpu_driver


def test_an_ami_the_operator_names_is_theirs_to_know() -> None:
    by_id = Config.from_env({"SPOTCTL_AMI_ID": "ami-0123456789abcdef0", "SPOTCTL_AUTH": "iam"})
    assert by_id.families_without_gpu_driver == frozenset()
    other = Config.from_env({"SPOTCTL_AMI_PARAMETER": "/mine/ami-id", "SPOTCTL_AUTH": "iam"})
    assert other.families_without_gpu_driver == frozenset()
