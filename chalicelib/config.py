"""Control-plane settings: one frozen dataclass, read once from the environment.

``.chalice/config.json`` sets these variables per stage; the sandbox and the tests set
them directly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

# Who may call the user routes (POST/GET/DELETE /jobs...):
# "iam": API Gateway checks SigV4 (deployed stages; the routes carry IAMAuthorizer);
# "token": a bearer token equal to SPOTCTL_API_TOKEN (the sandbox); an empty token
#   refuses every call, so a stage that forgot to configure one stays closed;
# "none": anyone who reaches the endpoint (only the functional tests choose it).
AuthMode = Literal["iam", "token", "none"]
AUTH_MODES: tuple[AuthMode, ...] = ("iam", "token", "none")


def _split(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _mapping(value: str) -> dict[str, str]:
    """Parse ``"us-east-1a=subnet-1,us-east-1b=subnet-2"``."""
    pairs = (item.split("=", 1) for item in _split(value))
    return {key.strip(): val.strip() for key, val in pairs}


# The stage's default AMI (.chalice/config.json): AWS's Deep Learning Base OSS Nvidia
# Driver GPU AMI (Amazon Linux 2023). Its NVIDIA driver (595 in its 2026 releases)
# drives none of these families' GPUs: the AMI's release notes list as supported only
# G4dn, G5, G6, Gr6, G6e, G7e, P4d, P4de, P5, P5e, P5en, P6-B200 and P6-B300 (release
# 20260519). P3 (V100), P3dn and G3 are listed by the Amazon Linux 2 proprietary-driver
# DLAMI instead, P2 by none, and G4ad's GPU is AMD's. Non-GPU families are not listed:
# they run on it, without a GPU to drive.
DEFAULT_AMI_PARAMETER = (
    "/aws/service/deeplearning/ami/x86_64/"
    "base-oss-nvidia-driver-gpu-amazon-linux-2023/latest/ami-id"
)
UNSUPPORTED_BY_AMI = {DEFAULT_AMI_PARAMETER: frozenset({"p2", "p3", "p3dn", "g3", "g3s", "g4ad"})}


@dataclass(frozen=True)
class Config:
    table_name: str
    region: str
    api_url: str = ""  # where instance agents report; empty until the first deploy
    bucket: str = ""  # default bucket for results when a job names none
    signing_key: str = ""  # HMAC key for per-job secrets (sandbox and tests)
    signing_key_parameter: str = ""  # SSM SecureString holding the key (deployed stages)
    ami_id: str = ""
    ami_parameter: str = ""  # SSM public parameter resolving to the AMI id
    instance_profile: str = ""
    subnets: dict[str, str] = field(default_factory=dict)  # AZ -> subnet id
    security_groups: tuple[str, ...] = ()
    stage: str = "dev"
    auth: AuthMode = "token"
    api_token: str = ""  # the sandbox's bearer token for the user routes (auth "token")

    @property
    def families_without_gpu_driver(self) -> frozenset[str]:
        """Instance families whose GPU the stage's AMI cannot drive, where it is known:
        only for a known AMI parameter (an AMI id or another parameter is the
        operator's choice, and theirs to know)."""
        if self.ami_id:
            return frozenset()
        return UNSUPPORTED_BY_AMI.get(self.ami_parameter, frozenset())

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Config:
        env = dict(os.environ) if env is None else env
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
        wanted = env.get("SPOTCTL_AUTH", "token").lower()
        auth = next((mode for mode in AUTH_MODES if mode == wanted), None)
        if auth is None:
            raise ValueError(f"SPOTCTL_AUTH: must be one of {', '.join(AUTH_MODES)}")
        return cls(
            table_name=env.get("SPOTCTL_TABLE", "spotctl-jobs"),
            region=region,
            api_url=env.get("SPOTCTL_API_URL", "").rstrip("/"),
            bucket=env.get("SPOTCTL_BUCKET", ""),
            signing_key=env.get("SPOTCTL_SIGNING_KEY", ""),
            signing_key_parameter=env.get("SPOTCTL_SIGNING_KEY_PARAMETER", ""),
            ami_id=env.get("SPOTCTL_AMI_ID", ""),
            ami_parameter=env.get("SPOTCTL_AMI_PARAMETER", ""),
            instance_profile=env.get("SPOTCTL_INSTANCE_PROFILE", ""),
            subnets=_mapping(env.get("SPOTCTL_SUBNETS", "")),
            security_groups=_split(env.get("SPOTCTL_SECURITY_GROUPS", "")),
            stage=env.get("SPOTCTL_STAGE", "dev"),
            auth=auth,
            api_token=env.get("SPOTCTL_API_TOKEN", ""),
        )
