"""Wiring: the one place that builds the control plane from config and clients.

Built on first use, never at import (moto, the sandbox or the Lambda's environment
must be in place first), and cached for the life of the Lambda container.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from functools import cache

from chalicelib import clients
from chalicelib.agent_auth import derive_secret
from chalicelib.config import Config
from chalicelib.ec2 import Ec2Gateway, LaunchSettings
from chalicelib.fleet import FleetRecords
from chalicelib.models import Attempt, Job
from chalicelib.reconcile import Reconciler
from chalicelib.service import JobService
from chalicelib.store import JobStore
from chalicelib.userdata import AgentParams, render_user_data


@dataclass
class ControlPlane:
    config: Config
    store: JobStore
    reconciler: Reconciler
    service: JobService


class _Secrets:
    """Values that live in SSM on deployed stages, read once per container."""

    def __init__(self, config: Config) -> None:
        self._config = config

    @cache  # noqa: B019 - one instance per container, by design
    def signing_key(self) -> str:
        if self._config.signing_key:
            return self._config.signing_key
        if not self._config.signing_key_parameter:
            raise RuntimeError("set SPOTCTL_SIGNING_KEY or SPOTCTL_SIGNING_KEY_PARAMETER")
        response = clients.ssm(self._config.region).get_parameter(
            Name=self._config.signing_key_parameter, WithDecryption=True
        )
        return response["Parameter"]["Value"]

    @cache  # noqa: B019
    def ami_id(self) -> str:
        if self._config.ami_id:
            return self._config.ami_id
        response = clients.ssm(self._config.region).get_parameter(Name=self._config.ami_parameter)
        return response["Parameter"]["Value"]


def agent_params(job: Job, attempt: Attempt, config: Config, secret: str) -> AgentParams:
    """What the instance of ``attempt`` runs: the one-job user data renders it, and a
    batch's member table carries one per member (``chalicelib.batch``)."""
    assert job.volume is not None, "the volume is created before the launch"
    checkpoint = job.spec.checkpoint
    return AgentParams(
        job_id=job.job_id,
        attempt=attempt.number,
        api_url=config.api_url,
        secret=secret,
        volume_id=job.volume.volume_id,
        command=job.spec.command,
        image=job.spec.image,
        s3_prefix=s3_prefix_for(job, config),
        checkpoint_dir=checkpoint.directory,
        grace_seconds=checkpoint.grace_seconds,
        stop_signal=checkpoint.stop_signal,
        sync_interval_seconds=checkpoint.sync_interval_seconds,
        env=tuple(job.spec.env.items()),
    )


def s3_prefix_for(job: Job, config: Config) -> str | None:
    if job.results_prefix:
        return job.results_prefix
    return f"s3://{config.bucket}/jobs/{job.job_id}" if config.bucket else None


def build(config: Config) -> ControlPlane:
    secrets = _Secrets(config)
    store = JobStore(clients.dynamodb(config.region), config.table_name)
    fleet = FleetRecords(clients.dynamodb(config.region), config.table_name)

    def launch_settings() -> LaunchSettings:
        return LaunchSettings(
            ami_id=secrets.ami_id(),
            instance_profile=config.instance_profile,
            subnets=config.subnets,
            security_groups=config.security_groups,
        )

    plane: ControlPlane | None = None

    def user_data(job: Job, attempt: Attempt) -> str:
        # The plane's config as it is now: the API handler may learn its URL later.
        now_config = plane.config if plane is not None else config
        secret = derive_secret(secrets.signing_key(), job.job_id)
        return render_user_data(agent_params(job, attempt, now_config, secret))

    reconciler = Reconciler(
        store=store,
        ec2=Ec2Gateway(clients.ec2(config.region)),
        launch_settings=launch_settings,
        render_user_data=user_data,
        clock=time.time,
        fleet=fleet,
        bucket=config.bucket,
    )
    service = JobService(
        store,
        reconciler,
        secrets.signing_key,
        time.time,
        region=config.region,
        bucket=config.bucket,
        families_without_gpu_driver=config.families_without_gpu_driver,
    )
    plane = ControlPlane(config, store, reconciler, service)
    return plane


@cache
def control_plane() -> ControlPlane:
    return build(Config.from_env())


def learn_api_url(url: str) -> None:
    """Take ``url`` as the API's, if the deployment gave none.

    On a CloudFormation stage (docs/deploy.md, path B) every function is given the
    API's URL except the API handler itself: the API refers to that function, so the
    function cannot refer to the API. It learns the URL from the requests API Gateway
    sends it, which name the API's domain and stage."""
    plane = control_plane()
    if not plane.config.api_url:
        plane.config = replace(plane.config, api_url=url.rstrip("/"))


def reset() -> None:
    """Forget the wiring and the clients (tests change the environment between cases)."""
    control_plane.cache_clear()
    clients.reset()
