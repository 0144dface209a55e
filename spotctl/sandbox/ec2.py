"""The EC2 rules moto does not enforce, applied to the Query-API calls the proxy sees.

``SandboxEc2`` answers or rewrites the calls that matter to spotctl and forwards the
rest: spot capacity and price at launch, ClientToken idempotency, the EBS attach rules
and a slow detach, instance state-change events, and spot interruptions driven by the
market (``tick``). State it keeps beside moto: the instances it launched (pool, market,
max price, user data, interruption), the volumes still detaching, and the idempotency
tokens it has seen.

With tags in instance metadata allowed, EC2 restricts instance tag keys (EC2 user
guide, "View tags for your EC2 instances using instance metadata": letters, digits and
``+ - = . , _ : @`` only, and not ``.``, ``..`` or ``_index``): a launch with another key
fails, and so does tagging a running instance with one. moto accepts any key; the
sandbox refuses them (the guide names no error code: ``InvalidParameterValue`` here).
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import json
import random
import re
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from botocore.config import Config
from botocore.exceptions import ClientError
from moto.ec2.models.instance_types import INSTANCE_TYPE_OFFERINGS

from spotctl.sandbox.clock import Clock, iso, iso_millis
from spotctl.sandbox.events import (
    INTERRUPTION_WARNING,
    REBALANCE_RECOMMENDATION,
    STATE_CHANGE,
    Event,
    ec2_event,
    event_id,
)
from spotctl.sandbox.market import SpotMarket
from spotctl.sandbox.moto_patch import (
    instance_metadata_tags,
    known_instance_type,
    set_launch_time,
)
from spotctl.sandbox.proxy import (
    EC2_NAMESPACE,
    Ec2Error,
    Ec2Request,
    Upstream,
    UpstreamResponse,
    answer_in_process,
    sandbox_client,
    xml_response,
)
from spotctl.sandbox.throttle import Ec2Throttle

DEFAULT_ACCOUNT = "123456789012"  # moto's default account
INTERRUPTION_NOTICE_SECONDS = 120.0
_IDEMPOTENT_ACTIONS = {"RunInstances", "CreateVolume"}
_IMDS_TAG_KEY = re.compile(r"[A-Za-z0-9+\-=.,_:@]+")
_IMDS_RESERVED_TAG_KEYS = {".", "..", "_index"}
_LOCAL_VOLUME_FILTERS = {
    "status",
    "attachment.status",
    "attachment.instance-id",
    "attachment.device",
}

ET.register_namespace("", "http://ec2.amazonaws.com/doc/2016-11-15")


class Lifecycle(enum.StrEnum):
    """What happened to an instance, for observers such as the instance emulator."""

    RUNNING = "running"  # launched (or started again) and booted
    STOPPED = "stopped"  # stopped; its volumes stay attached
    TERMINATED = "terminated"  # gone, by API call or spot interruption
    VOLUME_ATTACHED = "volume-attached"  # a data volume was attached
    VOLUME_DETACHED = "volume-detached"  # a data volume finished detaching


@dataclass(frozen=True)
class InstanceInfo:
    """What an observer may need to emulate an instance."""

    instance_id: str
    region: str
    az: str
    instance_type: str
    market: str  # "spot" or "on-demand"
    max_price: float | None
    user_data: str
    launched_at: float
    volumes: dict[str, str] = field(default_factory=dict)  # volume id -> device


@dataclass(frozen=True)
class LifecycleEvent:
    kind: Lifecycle
    instance: InstanceInfo
    volume_id: str | None = None
    device: str | None = None
    reason: str | None = None


@dataclass
class Interruption:
    """A spot interruption under way: noticed, then terminated two minutes later."""

    reason: str  # "capacity" or "price"
    noticed_at: float
    terminate_at: float
    rebalance: bool


# EC2's StateReason (code, message) of an instance that ended other than by the API's
# TerminateInstances (which moto reports: Client.UserInitiatedShutdown).
SHUT_DOWN_FROM_INSIDE = (
    "Client.InstanceInitiatedShutdown",
    "Client.InstanceInitiatedShutdown: Instance initiated shutdown",
)
SPOT_TERMINATION = (
    "Server.SpotInstanceTermination",
    "Server.SpotInstanceTermination: Spot instance termination",
)


@dataclass
class _Instance:
    info: InstanceInfo
    state: str = "running"
    interruption: Interruption | None = None
    reason: tuple[str, str] | None = None  # its StateReason, where moto's is wrong


@dataclass(frozen=True)
class _Detaching:
    volume_id: str
    instance_id: str
    device: str
    region: str
    started: float
    until: float


@dataclass(frozen=True)
class SandboxEc2Options:
    """Knobs of the EC2 rules; times are sandbox seconds."""

    account: str = DEFAULT_ACCOUNT
    detach_seconds: float = 10.0
    notice_seconds: float = INTERRUPTION_NOTICE_SECONDS
    rebalance_probability: float = 0.5
    warning_probability: float = 1.0
    seed: int = 0


def _text(node: ET.Element, path: str, default: str = "") -> str:
    found = node.find(path)
    return found.text or default if found is not None and found.text is not None else default


def _indexed(params: dict[str, str], prefix: str) -> list[str]:
    """Values of ``Prefix.1``, ``Prefix.2``, ... in order."""
    found = []
    for key, value in params.items():
        head, _, index = key.rpartition(".")
        if head == prefix and index.isdigit():
            found.append((int(index), value))
    return [v for _, v in sorted(found)]


def _filters(params: dict[str, str]) -> list[tuple[str, list[str]]]:
    names = {
        k.split(".")[1]: v
        for k, v in params.items()
        if k.startswith("Filter.") and k.endswith(".Name")
    }
    return [
        (name, _indexed(params, f"Filter.{n}.Value"))
        for n, name in sorted(names.items(), key=lambda x: int(x[0]))
    ]


def _without_filters(params: dict[str, str], drop: set[str]) -> dict[str, str]:
    kept = [(name, values) for name, values in _filters(params) if name not in drop]
    out = {k: v for k, v in params.items() if not k.startswith("Filter.")}
    for n, (name, values) in enumerate(kept, start=1):
        out[f"Filter.{n}.Name"] = name
        for m, value in enumerate(values, start=1):
            out[f"Filter.{n}.Value.{m}"] = value
    return out


def _check_imds_tag_keys(keys: list[str]) -> None:
    """Refuse tag keys IMDS cannot serve, as EC2 does where tags are in metadata."""
    for key in keys:
        if not _IMDS_TAG_KEY.fullmatch(key) or key in _IMDS_RESERVED_TAG_KEYS:
            raise Ec2Error(
                "InvalidParameterValue",
                f"The tag key '{key}' is not allowed on an instance with tags in instance "
                "metadata: use letters, digits and + - = . , _ : @ only, and not '.', "
                "'..' or '_index'.",
            )


def _instance_tag_keys(params: dict[str, str]) -> list[str]:
    """The keys of a RunInstances' tag specifications for the instance itself."""
    keys = []
    for key, value in params.items():
        parts = key.split(".")
        if (
            len(parts) == 5
            and parts[0] == "TagSpecification"
            and parts[2] == "Tag"
            and parts[4] == "Key"
            and params.get(f"TagSpecification.{parts[1]}.ResourceType") == "instance"
        ):
            keys.append(value)
    return keys


def _parse(body: bytes) -> ET.Element:
    return ET.fromstring(body)  # noqa: S314 - moto's own answer, over loopback


def _parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _region_azs(region: str) -> list[str]:
    offers = INSTANCE_TYPE_OFFERINGS["availability-zone"].get(region, [])
    return sorted({offer["Location"] for offer in offers}) or [f"{region}a"]


class SandboxEc2:
    """Handles EC2 calls for the proxy; ``tick()`` runs the market."""

    def __init__(
        self,
        upstream: Upstream,
        clock: Clock,
        market: SpotMarket,
        emit: Callable[[Event], None],
        notify: Callable[[LifecycleEvent], None],
        options: SandboxEc2Options | None = None,
    ) -> None:
        self.upstream = upstream
        self.clock = clock
        self.market = market
        self.options = options or SandboxEc2Options()
        self._emit = emit
        self._notify = notify
        self._rng = random.Random(self.options.seed)
        self._lock = threading.RLock()
        self._launch_lock = threading.Lock()
        self._volume_lock = threading.Lock()
        self._instances: dict[str, _Instance] = {}
        self._detaching: dict[str, _Detaching] = {}
        self._tokens: dict[tuple[str, str, str], tuple[str, UpstreamResponse]] = {}
        self._clients: dict[str, Any] = {}
        # EC2's request rate limits; None (the default) admits every call.
        self.throttle: Ec2Throttle | None = None

    # -- the proxy's entry point -------------------------------------------------------

    def handle(self, request: Ec2Request) -> UpstreamResponse:
        if self.throttle is not None:
            self.throttle.admit(request.action)
        handlers: dict[str, Callable[[Ec2Request], UpstreamResponse]] = {
            "RunInstances": self._run_instances,
            "CreateVolume": self._create_volume,
            "TerminateInstances": self._terminate_instances,
            "StopInstances": self._stop_instances,
            "StartInstances": self._start_instances,
            "AttachVolume": self._attach_volume,
            "DetachVolume": self._detach_volume,
            "DeleteVolume": self._delete_volume,
            "DescribeVolumes": self._describe_volumes,
            "DescribeInstances": self._describe_instances,
            "DescribeSpotPriceHistory": self._describe_spot_price_history,
            "CreateTags": self._create_tags,
        }
        handler = handlers.get(request.action)
        if handler is None:
            return self.upstream.send_ec2(request, request.params)
        return handler(request)

    # -- observation, for the instance emulator and tests --------------------------------

    def instance(self, instance_id: str) -> InstanceInfo | None:
        with self._lock:
            record = self._instances.get(instance_id)
            return record.info if record else None

    def instances(self) -> list[InstanceInfo]:
        with self._lock:
            return [r.info for r in self._instances.values()]

    def instance_state(self, instance_id: str) -> str | None:
        with self._lock:
            record = self._instances.get(instance_id)
            return record.state if record else None

    def interruption(self, instance_id: str) -> Interruption | None:
        with self._lock:
            record = self._instances.get(instance_id)
            return record.interruption if record else None

    def instance_action(self, instance_id: str) -> dict[str, str] | None:
        """IMDS ``spot/instance-action`` for the instance, or None (IMDS answers 404)."""
        notice = self.interruption(instance_id)
        if notice is None:
            return None
        return {"action": "terminate", "time": iso(notice.terminate_at)}

    def rebalance_notice(self, instance_id: str) -> dict[str, str] | None:
        """IMDS ``events/recommendations/rebalance`` for the instance, or None."""
        notice = self.interruption(instance_id)
        if notice is None or not notice.rebalance:
            return None
        return {"noticeTime": iso(notice.noticed_at)}

    def metadata_tags(self, instance_id: str) -> dict[str, str] | None:
        """IMDS ``tags/instance`` for the instance: its tags now, as moto holds them (so a
        CreateTags shows at once), or None (IMDS answers 404) unless it was launched with
        ``InstanceMetadataTags`` enabled."""
        info = self.instance(instance_id)
        if info is None:
            return None
        return instance_metadata_tags(self.options.account, info.region, instance_id)

    def next_due(self) -> float:
        """The next sandbox time a timer of ours fires (inf if none)."""
        with self._lock:
            times = [d.until for d in self._detaching.values()]
            times += [
                r.interruption.terminate_at
                for r in self._instances.values()
                if r.interruption is not None and r.state not in {"terminated", "shutting-down"}
            ]
        return min(times, default=float("inf"))

    # -- the market ----------------------------------------------------------------------

    def tick(self) -> None:
        """Interrupt spot instances whose pool lost capacity or price; end due timers."""
        now = self.clock.now()
        self._expire_detaches(now)
        due: list[_Instance] = []
        with self._lock:
            live = [r for r in self._instances.values() if r.state in {"pending", "running"}]
            for record in sorted(live, key=lambda r: (r.info.launched_at, r.info.instance_id)):
                if record.info.market != "spot":
                    continue
                if record.interruption is None:
                    self._maybe_interrupt(record, now)
                elif now >= record.interruption.terminate_at:
                    due.append(record)
        for record in due:
            self._terminate_interrupted(record)

    def _maybe_interrupt(self, record: _Instance, now: float) -> None:
        info = record.info
        reason = None
        if not self.market.available(info.instance_type, info.az, now):
            reason = "capacity"
        elif (
            info.max_price is not None
            and self.market.price(info.instance_type, info.az, now) > info.max_price
        ):
            reason = "price"
        if reason is not None:
            self._start_interruption(record, reason, now)

    def interrupt(self, instance_id: str, reason: str = "capacity") -> bool:
        """Interrupt a running spot instance now, as the market would (benchmarks, tests).

        Returns False if the instance is not a live spot instance or is already noticed.
        """
        with self._lock:
            record = self._instances.get(instance_id)
            if (
                record is None
                or record.info.market != "spot"
                or record.state not in {"pending", "running"}
                or record.interruption is not None
            ):
                return False
            self._start_interruption(record, reason, self.clock.now())
            return True

    def _start_interruption(self, record: _Instance, reason: str, now: float) -> None:
        info = record.info
        rebalance = self._rng.random() < self.options.rebalance_probability
        warn = self._rng.random() < self.options.warning_probability
        record.interruption = Interruption(
            reason, now, now + self.options.notice_seconds, rebalance
        )
        if rebalance:
            self._emit_instance(REBALANCE_RECOMMENDATION, info, {})
        if warn:
            self._emit_instance(INTERRUPTION_WARNING, info, {"instance-action": "terminate"})

    def _terminate_interrupted(self, record: _Instance) -> None:
        info = record.info
        attached = self._data_volumes_of(info.region, [info.instance_id])
        with self._lock:
            record.reason = record.reason or SPOT_TERMINATION
        try:
            self._client(info.region).terminate_instances(InstanceIds=[info.instance_id])
        except ClientError:
            return
        reason = record.interruption.reason if record.interruption else "interrupted"
        self._after_termination(info.region, [info.instance_id], attached, f"spot-{reason}")

    # -- launches --------------------------------------------------------------------------

    def _idempotent(
        self, request: Ec2Request, launch: Callable[[dict[str, str]], UpstreamResponse]
    ) -> UpstreamResponse:
        token = request.get("ClientToken")
        params = dict(request.params)
        if not token:
            return launch(params)
        key = (request.region, request.action, token)
        fingerprint = hashlib.sha256(
            json.dumps(
                {k: v for k, v in params.items() if k not in {"ClientToken", "Version"}},
                sort_keys=True,
            ).encode()
        ).hexdigest()
        with self._launch_lock:
            seen = self._tokens.get(key)
            if seen is not None:
                if seen[0] != fingerprint:
                    raise Ec2Error(
                        "IdempotentParameterMismatch",
                        f"The client token '{token}' was already used with different parameters.",
                    )
                return seen[1]
            answer = launch(params)
            if answer.status == 200:
                self._tokens[key] = (fingerprint, answer)
            return answer

    def _run_instances(self, request: Ec2Request) -> UpstreamResponse:
        return self._idempotent(request, lambda params: self._launch(request, params))

    def _launch(self, request: Ec2Request, params: dict[str, str]) -> UpstreamResponse:
        instance_type = params.get("InstanceType", "m1.small")
        if not known_instance_type(instance_type):
            raise Ec2Error(
                "InvalidParameterValue", f"Invalid value '{instance_type}' for InstanceType."
            )
        if params.get("MetadataOptions.InstanceMetadataTags") == "enabled":
            _check_imds_tag_keys(_instance_tag_keys(params))
        spot = params.get("InstanceMarketOptions.MarketType") == "spot"
        now = self.clock.now()
        az = self._launch_az(request, params, instance_type, spot, now)
        params["Placement.AvailabilityZone"] = az
        max_price: float | None = None
        if spot:
            max_price = float(
                params.get("InstanceMarketOptions.SpotOptions.MaxPrice")
                or self.market.on_demand_price(instance_type)
            )
            price = self.market.price(instance_type, az, now)
            if max_price < price:
                raise Ec2Error(
                    "SpotMaxPriceTooLow",
                    f"Your Spot request price of {max_price:g} is lower than the minimum required "
                    f"Spot request fulfillment price of {price:g}.",
                )
            if not self.market.available(instance_type, az, now):
                # A server error on EC2 (HTTP 500, which botocore's retry modes retry).
                raise Ec2Error(
                    "InsufficientInstanceCapacity",
                    f"There is no Spot capacity available that matches your request "
                    f"({instance_type} in {az}).",
                    status=500,
                )
        # EC2 starts as many as it can up to MaxCount; moto starts MinCount. The sandbox's
        # capacity is all or nothing per pool, so "as many as it can" is MaxCount.
        if params.get("MaxCount"):
            params["MinCount"] = params["MaxCount"]
        answer = self.upstream.send_ec2(request, params)
        if answer.status != 200:
            return answer
        user_data = self._decode_user_data(params.get("UserData", ""))
        launched = []
        for item in _parse(answer.body).iterfind("{*}instancesSet/{*}item"):
            info = InstanceInfo(
                instance_id=_text(item, "{*}instanceId"),
                region=request.region,
                az=_text(item, "{*}placement/{*}availabilityZone", az),
                instance_type=_text(item, "{*}instanceType", instance_type),
                market="spot" if spot else "on-demand",
                max_price=max_price,
                user_data=user_data,
                launched_at=now,
            )
            launched.append(info)
        for info in launched:
            set_launch_time(self.options.account, request.region, info.instance_id, now)
        with self._lock:
            for info in launched:
                self._instances[info.instance_id] = _Instance(info)
        for info in launched:
            self._emit_instance(STATE_CHANGE, info, {"state": "pending"})
            self._emit_instance(STATE_CHANGE, info, {"state": "running"})
            self._notify(LifecycleEvent(Lifecycle.RUNNING, info))
        return answer

    def _launch_az(
        self,
        request: Ec2Request,
        params: dict[str, str],
        instance_type: str,
        spot: bool,
        now: float,
    ) -> str:
        az = params.get("Placement.AvailabilityZone")
        if az:
            return az
        subnet = params.get("SubnetId") or params.get("NetworkInterface.1.SubnetId")
        if subnet:
            try:
                found = self._client(request.region).describe_subnets(SubnetIds=[subnet])
                return str(found["Subnets"][0]["AvailabilityZone"])
            except ClientError:
                pass
        zones = _region_azs(request.region)
        if spot:
            # Like EC2 without a placement: any AZ of the region that has capacity.
            for zone in zones:
                if self.market.available(instance_type, zone, now):
                    return zone
        return zones[0]

    @staticmethod
    def _decode_user_data(encoded: str) -> str:
        try:
            return base64.b64decode(encoded).decode("utf-8", errors="replace")
        except (binascii.Error, ValueError):
            return encoded

    def _create_tags(self, request: Ec2Request) -> UpstreamResponse:
        params = request.params
        resources = _indexed(params, "ResourceId")
        if any(self.metadata_tags(resource) is not None for resource in resources):
            _check_imds_tag_keys(
                [v for k, v in params.items() if k.startswith("Tag.") and k.endswith(".Key")]
            )
        return self.upstream.send_ec2(request, params)

    def _create_volume(self, request: Ec2Request) -> UpstreamResponse:
        # EC2: a volume made from a snapshot is at least the snapshot's size (moto
        # makes a smaller one).
        snapshot_id, size = request.params.get("SnapshotId"), request.params.get("Size")
        if snapshot_id and size:
            client = self._client(request.region)
            try:
                snapshots = client.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"]
            except ClientError:
                snapshots = []  # moto says what EC2 says of a snapshot it does not know
            least = max((int(s.get("VolumeSize", 0)) for s in snapshots), default=0)
            if int(size) < least:
                raise Ec2Error(
                    "InvalidParameterValue",
                    f"Volume of {size}GiB is too small; minimum is {least}GiB.",
                )
        return self._idempotent(request, lambda params: self.upstream.send_ec2(request, params))

    # -- state changes ---------------------------------------------------------------------

    def _terminate_instances(self, request: Ec2Request) -> UpstreamResponse:
        ids = _indexed(request.params, "InstanceId")
        attached = self._data_volumes_of(request.region, ids)
        answer = self.upstream.send_ec2(request, request.params)
        if answer.status == 200:
            ended = [
                _text(item, "{*}instanceId")
                for item in _parse(answer.body).iterfind("{*}instancesSet/{*}item")
                if _text(item, "{*}previousState/{*}name") not in {"terminated", "shutting-down"}
            ]
            self._after_termination(request.region, ended, attached, "terminated-by-user")
        return answer

    def _after_termination(
        self, region: str, instance_ids: list[str], attached: list[_Detaching], reason: str
    ) -> None:
        now = self.clock.now()
        infos = []
        with self._lock:
            for instance_id in instance_ids:
                record = self._instances.get(instance_id)
                if record is None:
                    continue
                record.state = "terminated"
                infos.append(record.info)
            with self._volume_lock:
                for attachment in attached:
                    if attachment.instance_id in instance_ids:
                        self._detaching[attachment.volume_id] = replace(
                            attachment, started=now, until=now + self.options.detach_seconds
                        )
        for info in infos:
            self._emit_instance(STATE_CHANGE, info, {"state": "shutting-down"})
            self._emit_instance(STATE_CHANGE, info, {"state": "terminated"})
            self._notify(LifecycleEvent(Lifecycle.TERMINATED, info, reason=reason))

    def _stop_instances(self, request: Ec2Request) -> UpstreamResponse:
        ids = _indexed(request.params, "InstanceId")
        with self._lock:
            for instance_id in ids:
                record = self._instances.get(instance_id)
                if record is not None and record.info.market == "spot":
                    raise Ec2Error(
                        "UnsupportedOperation",
                        f"You can't stop the Spot Instance '{instance_id}' because it is "
                        "associated with a one-time Spot Instance request. You can only stop "
                        "Spot Instances associated with a persistent request.",
                    )
        answer = self.upstream.send_ec2(request, request.params)
        if answer.status == 200:
            self._state_changed(ids, ["stopping", "stopped"], Lifecycle.STOPPED)
        return answer

    def _start_instances(self, request: Ec2Request) -> UpstreamResponse:
        ids = _indexed(request.params, "InstanceId")
        answer = self.upstream.send_ec2(request, request.params)
        if answer.status == 200:
            self._state_changed(ids, ["pending", "running"], Lifecycle.RUNNING)
        return answer

    def _state_changed(self, ids: list[str], states: list[str], kind: Lifecycle) -> None:
        infos = []
        with self._lock:
            for instance_id in ids:
                record = self._instances.get(instance_id)
                if record is not None:
                    record.state = states[-1]
                    infos.append(record.info)
        for info in infos:
            for state in states:
                self._emit_instance(STATE_CHANGE, info, {"state": state})
            self._notify(LifecycleEvent(kind, info))

    # -- EBS -------------------------------------------------------------------------------

    def _attach_volume(self, request: Ec2Request) -> UpstreamResponse:
        volume_id = request.get("VolumeId", "") or ""
        instance_id = request.get("InstanceId", "") or ""
        device = request.get("Device", "") or ""
        self._expire_detaches(self.clock.now())
        with self._volume_lock:
            client = self._client(request.region)
            try:
                volume = client.describe_volumes(VolumeIds=[volume_id])["Volumes"][0]
                reservations = client.describe_instances(InstanceIds=[instance_id])["Reservations"]
                instance = reservations[0]["Instances"][0]
            except (ClientError, IndexError):
                return self.upstream.send_ec2(request, request.params)  # moto's NotFound
            if volume["AvailabilityZone"] != instance["Placement"]["AvailabilityZone"]:
                raise Ec2Error(
                    "InvalidVolume.ZoneMismatch",
                    f"The volume '{volume_id}' is not in the same availability zone as "
                    f"instance '{instance_id}'",
                )
            if volume_id in self._detaching or volume["State"] != "available":
                raise Ec2Error("VolumeInUse", f"{volume_id} is already attached to an instance")
            state = instance["State"]["Name"]
            if state not in {"running", "stopped"}:
                raise Ec2Error(
                    "IncorrectState",
                    f"Instance '{instance_id}' is not 'running' (it is '{state}').",
                )
            # One device name, one volume: the image's own mappings count too (moto
            # takes a second volume at a name in use).
            taken = {m.get("DeviceName") for m in instance.get("BlockDeviceMappings", [])}
            if device in taken:
                raise Ec2Error(
                    "InvalidParameterValue",
                    f"Invalid value '{device}' for unixDevice. "
                    f"Attachment point {device} is already in use",
                )
            answer = self.upstream.send_ec2(request, request.params)
        if answer.status == 200:
            info = self._set_volume(instance_id, volume_id, device)
            if info is not None:
                self._notify(LifecycleEvent(Lifecycle.VOLUME_ATTACHED, info, volume_id, device))
        return answer

    def _set_volume(
        self, instance_id: str, volume_id: str, device: str | None
    ) -> InstanceInfo | None:
        with self._lock:
            record = self._instances.get(instance_id)
            if record is None:
                return None
            volumes = dict(record.info.volumes)
            if device is None:
                volumes.pop(volume_id, None)
            else:
                volumes[volume_id] = device
            record.info = replace(record.info, volumes=volumes)
            return record.info

    def _detach_volume(self, request: Ec2Request) -> UpstreamResponse:
        volume_id = request.get("VolumeId", "") or ""
        params = dict(request.params)
        self._expire_detaches(self.clock.now())
        with self._volume_lock:
            if volume_id in self._detaching:
                raise Ec2Error(
                    "IncorrectState", f"Volume '{volume_id}' is in the 'detaching' state."
                )
            attachments = self._attachments_of(request.region, volume_id)
            if attachments:
                # moto needs the instance id; EC2 does not.
                params.setdefault("InstanceId", attachments[0].instance_id)
            answer = self.upstream.send_ec2(request, params)
            if answer.status == 200 and attachments:
                now = self.clock.now()
                force = params.get("Force", "").lower() == "true"
                delay = 0.0 if force else self.options.detach_seconds
                self._detaching[volume_id] = replace(attachments[0], started=now, until=now + delay)
        return answer

    def _delete_volume(self, request: Ec2Request) -> UpstreamResponse:
        volume_id = request.get("VolumeId", "") or ""
        self._expire_detaches(self.clock.now())
        with self._volume_lock:
            detaching = self._detaching.get(volume_id)
            if detaching is not None:
                raise Ec2Error(
                    "VolumeInUse",
                    f"Volume {volume_id} is currently attached to {detaching.instance_id}",
                )
            return self.upstream.send_ec2(request, request.params)

    def note_shutdown_from_inside(self, instance_id: str) -> None:
        """The instance's own OS is shutting it down (``shutdown -h now``), which EC2
        tells apart from a TerminateInstances call in the instance's StateReason."""
        with self._lock:
            record = self._instances.get(instance_id)
            if record is not None and record.reason is None:
                record.reason = SHUT_DOWN_FROM_INSIDE

    def _describe_instances(self, request: Ec2Request) -> UpstreamResponse:
        answer = self.upstream.send_ec2(request, request.params)
        with self._lock:
            reasons = {i: r.reason for i, r in self._instances.items() if r.reason is not None}
        if answer.status != 200 or not reasons:
            return answer
        root = _parse(answer.body)
        ns = "{" + EC2_NAMESPACE.rstrip("/") + "}"
        for item in root.iterfind("{*}reservationSet/{*}item/{*}instancesSet/{*}item"):
            reason = reasons.get(_text(item, "{*}instanceId"))
            if reason is None or _text(item, "{*}instanceState/{*}name") != "terminated":
                continue
            state_reason = item.find("{*}stateReason")
            if state_reason is None:
                state_reason = ET.SubElement(item, ns + "stateReason")
            for child in list(state_reason):
                state_reason.remove(child)
            ET.SubElement(state_reason, ns + "code").text = reason[0]
            ET.SubElement(state_reason, ns + "message").text = reason[1]
        body = ET.tostring(root, encoding="unicode")
        return UpstreamResponse(200, [("Content-Type", "text/xml")], body.encode())

    def _describe_volumes(self, request: Ec2Request) -> UpstreamResponse:
        self._expire_detaches(self.clock.now())
        with self._volume_lock:
            detaching = {k: v for k, v in self._detaching.items() if v.region == request.region}
        if not detaching:
            return self.upstream.send_ec2(request, request.params)
        local = [(n, vals) for n, vals in _filters(request.params) if n in _LOCAL_VOLUME_FILTERS]
        answer = self.upstream.send_ec2(
            request, _without_filters(request.params, _LOCAL_VOLUME_FILTERS)
        )
        if answer.status != 200:
            return answer
        root = _parse(answer.body)
        volume_set = root.find("{*}volumeSet")
        if volume_set is None:
            return answer
        for item in list(volume_set):
            pending = detaching.get(_text(item, "{*}volumeId"))
            if pending is not None:
                self._show_detaching(item, pending)
            if not self._volume_matches(item, local):
                volume_set.remove(item)
        body = ET.tostring(root, encoding="unicode")
        return UpstreamResponse(200, [("Content-Type", "text/xml")], body.encode())

    @staticmethod
    def _show_detaching(item: ET.Element, detaching: _Detaching) -> None:
        ns = "{" + EC2_NAMESPACE.rstrip("/") + "}"
        status = item.find("{*}status")
        if status is not None:
            status.text = "in-use"
        attachments = item.find("{*}attachmentSet")
        if attachments is None:
            attachments = ET.SubElement(item, ns + "attachmentSet")
        for child in list(attachments):
            attachments.remove(child)
        entry = ET.SubElement(attachments, ns + "item")
        for tag, value in (
            ("volumeId", detaching.volume_id),
            ("instanceId", detaching.instance_id),
            ("device", detaching.device),
            ("status", "detaching"),
            ("attachTime", iso_millis(detaching.started)),
            ("deleteOnTermination", "false"),
        ):
            ET.SubElement(entry, ns + tag).text = value

    @staticmethod
    def _volume_matches(item: ET.Element, filters: list[tuple[str, list[str]]]) -> bool:
        attachment_items = item.findall("{*}attachmentSet/{*}item")
        for name, values in filters:
            if name == "status":
                got = [_text(item, "{*}status")]
            else:
                field_name = {
                    "attachment.status": "status",
                    "attachment.instance-id": "instanceId",
                }.get(name, "device")
                got = [_text(a, "{*}" + field_name) for a in attachment_items]
            if not set(got) & set(values):
                return False
        return True

    def _data_volumes_of(self, region: str, instance_ids: list[str]) -> list[_Detaching]:
        """Volumes attached through AttachVolume (root volumes go with the instance)."""
        with self._lock:
            return [
                _Detaching(volume_id, instance_id, device, region, 0.0, 0.0)
                for instance_id in instance_ids
                if instance_id in self._instances
                for volume_id, device in self._instances[instance_id].info.volumes.items()
            ]

    def _attachments_of(self, region: str, volume_id: str) -> list[_Detaching]:
        """The volume's current attachments, as moto reports them."""
        client = self._client(region)
        try:
            volumes = client.describe_volumes(VolumeIds=[volume_id])["Volumes"]
        except ClientError:
            return []
        found = []
        for volume in volumes:
            for attachment in volume.get("Attachments", []):
                found.append(
                    _Detaching(
                        volume["VolumeId"],
                        attachment["InstanceId"],
                        attachment["Device"],
                        region,
                        0.0,
                        0.0,
                    )
                )
        return found

    def _expire_detaches(self, now: float) -> None:
        with self._volume_lock:
            done = [d for d in self._detaching.values() if d.until <= now]
            for detach in done:
                del self._detaching[detach.volume_id]
        for detach in done:
            info = self._set_volume(detach.instance_id, detach.volume_id, None)
            if info is not None:
                self._notify(
                    LifecycleEvent(Lifecycle.VOLUME_DETACHED, info, detach.volume_id, detach.device)
                )

    def detaching(self, volume_id: str) -> bool:
        with self._volume_lock:
            return volume_id in self._detaching

    # -- spot price history ----------------------------------------------------------------

    def _describe_spot_price_history(self, request: Ec2Request) -> UpstreamResponse:
        params = request.params
        filters = dict(_filters(params))
        types = _indexed(params, "InstanceType") or filters.get("instance-type")
        azs = (
            [params["AvailabilityZone"]]
            if params.get("AvailabilityZone")
            else _region_azs(request.region)
        )
        if "availability-zone" in filters:
            azs = [az for az in azs if az in filters["availability-zone"]]
        products = _indexed(params, "ProductDescription") or filters.get("product-description")
        now = self.clock.now()
        start = _parse_time(params["StartTime"]) if params.get("StartTime") else None
        end = min(_parse_time(params["EndTime"]), now) if params.get("EndTime") else now
        points = []
        if not products or any(p.startswith("Linux/UNIX") for p in products):
            points = self.market.history(types, azs, start, end)
        offset = int(params.get("NextToken") or 0)
        limit = int(params.get("MaxResults") or 1000)
        page = points[offset : offset + limit]
        next_token = str(offset + limit) if offset + limit < len(points) else ""
        items = "".join(
            "<item>"
            f"<instanceType>{p.instance_type}</instanceType>"
            "<productDescription>Linux/UNIX</productDescription>"
            f"<spotPrice>{p.price:.6f}</spotPrice>"
            f"<timestamp>{iso_millis(p.time)}</timestamp>"
            f"<availabilityZone>{p.az}</availabilityZone>"
            "</item>"
            for p in page
        )
        return xml_response(
            f'<DescribeSpotPriceHistoryResponse xmlns="{EC2_NAMESPACE}">'
            f"<requestId>{event_id(self._rng)}</requestId>"
            f"<spotPriceHistorySet>{items}</spotPriceHistorySet>"
            f"<nextToken>{next_token}</nextToken>"
            "</DescribeSpotPriceHistoryResponse>"
        )

    # -- plumbing --------------------------------------------------------------------------

    def _emit_instance(self, detail_type: str, info: InstanceInfo, detail: dict[str, str]) -> None:
        with self._lock:
            new_id = event_id(self._rng)
        self._emit(
            ec2_event(
                detail_type,
                info.instance_id,
                detail,
                region=info.region,
                account=self.options.account,
                when=self.clock.now(),
                event_id=new_id,
            )
        )

    def _client(self, region: str) -> Any:
        """A client that talks to moto directly, past our own rules."""
        with self._lock:
            client = self._clients.get(region)
            if client is None:
                client = sandbox_client(
                    "ec2",
                    region,
                    f"http://{self.upstream.host}:{self.upstream.port}",
                    config=Config(retries={"mode": "standard", "max_attempts": 1}),
                )
                answer_in_process(client, self.upstream.send)
                self._clients[region] = client
            return client
