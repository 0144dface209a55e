"""The EC2 gateway: only the calls the control plane makes, errors made typed."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, NoReturn

from botocore.exceptions import ClientError

from chalicelib.errors import (
    Ec2Failure,
    InsufficientCapacity,
    ResourceMissing,
    SpotPriceTooLow,
    VolumeBusy,
)
from chalicelib.models import Candidate, Pool

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client
    from mypy_boto3_ec2.type_defs import PaginatorConfigTypeDef

InstanceStateName = Literal[
    "pending", "running", "stopping", "stopped", "shutting-down", "terminated", "missing"
]

# The device name we ask for; on Nitro the kernel names it /dev/nvme<N>n1 anyway and
# the agent finds it by serial (the volume id without the hyphen).
DATA_DEVICE = "/dev/sdf"

_CAPACITY_CODES = frozenset(
    {
        "InsufficientInstanceCapacity",
        "InsufficientCapacity",
        "InsufficientHostCapacity",
        "Unsupported",  # the type is not offered in this AZ
        "MaxSpotInstanceCountExceeded",
        "InstanceLimitExceeded",
        "VcpuLimitExceeded",
    }
)
_PRICE_CODES = frozenset({"SpotMaxPriceTooLow"})
_BUSY_CODES = frozenset({"VolumeInUse", "IncorrectState", "InvalidVolume.NotFound.Transient"})
_MISSING_CODES = frozenset(
    {"InvalidVolume.NotFound", "InvalidInstanceID.NotFound", "InvalidSnapshot.NotFound"}
)

# Every instance and volume spotctl creates carries this tag (TagSpecifications at
# creation, so it is there from the first moment EC2 shows the resource).
JOB_TAG = "spotctl:job-id"
MOVE_TAG = "spotctl:move"  # on a move's snapshot: the move's number
# On an instance we are leaving (on-demand, to go back to spot): the agent reads it in
# the instance metadata (tags/instance/spotctl:leave), checkpoints, syncs and goes.
LEAVE_TAG = "spotctl:leave"
# EC2 refuses more values than this in one filter.
MAX_FILTER_VALUES = 200
# The largest page DescribeInstances / DescribeVolumes serve.
INSTANCES_PAGE = 1000
VOLUMES_PAGE = 500


# EC2's StateReason code for an instance shut down from its own OS (the agent's
# `shutdown -h now`), as against Server.SpotInstanceTermination and the like.
SHUT_DOWN_FROM_INSIDE = "Client.InstanceInitiatedShutdown"


@dataclass(frozen=True)
class InstanceView:
    instance_id: str
    state: InstanceStateName
    az: str = ""
    reason: str = ""  # EC2's StateReason code, when it gives one

    @property
    def gone(self) -> bool:
        """Terminated, terminating or unknown to EC2: it will never run again."""
        return self.state in ("shutting-down", "terminated", "missing")


@dataclass(frozen=True)
class VolumeView:
    volume_id: str
    state: str  # creating | available | in-use | deleting | deleted | error | missing
    az: str = ""
    size_gib: int = 0
    attached_to: str | None = None
    attach_state: str | None = None  # attaching | attached | detaching | busy
    job_id: str | None = None  # its spotctl:job-id tag: the job that created it

    @property
    def gone(self) -> bool:
        """Deleted, failed or unknown to EC2: its data is not coming back."""
        return self.state in ("deleting", "deleted", "error", "missing")


@dataclass(frozen=True)
class SnapshotView:
    snapshot_id: str
    state: str  # pending | completed | error | recoverable | recovering | missing

    @property
    def failed(self) -> bool:
        return self.state in ("error", "missing")


@dataclass(frozen=True)
class LaunchSettings:
    """What every instance gets, from the stage's config."""

    ami_id: str
    instance_profile: str = ""
    subnets: dict[str, str] = field(default_factory=dict)  # AZ -> subnet
    security_groups: tuple[str, ...] = ()


def _raise_typed(exc: ClientError) -> NoReturn:
    code = exc.response["Error"]["Code"]
    message = exc.response["Error"].get("Message", "")
    if code in _CAPACITY_CODES:
        raise InsufficientCapacity(f"{code}: {message}") from exc
    if code in _PRICE_CODES:
        raise SpotPriceTooLow(message) from exc
    if code in _BUSY_CODES:
        raise VolumeBusy(f"{code}: {message}") from exc
    if code in _MISSING_CODES:
        raise ResourceMissing(f"{code}: {message}") from exc
    raise Ec2Failure(code, message) from exc


def _volume_view(volume: Any) -> VolumeView:
    attachments = [a for a in volume.get("Attachments", []) if a.get("State") != "detached"]
    attachment = attachments[0] if attachments else None
    return VolumeView(
        volume["VolumeId"],
        volume["State"],
        volume["AvailabilityZone"],
        volume.get("Size", 0),
        attachment.get("InstanceId") if attachment else None,
        attachment.get("State") if attachment else None,
        next((t["Value"] for t in volume.get("Tags", []) if t["Key"] == JOB_TAG), None),
    )


def _tags(resource: str, tags: dict[str, str]) -> Any:
    return [{"ResourceType": resource, "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}]


class Ec2Gateway:
    def __init__(self, client: EC2Client) -> None:
        self._client = client

    # -- observing ---------------------------------------------------------------

    def describe_instances(self, instance_ids: Iterable[str]) -> dict[str, InstanceView]:
        """Every asked id gets a view; ids EC2 no longer knows are ``missing``."""
        ids = sorted(set(instance_ids))
        if not ids:
            return {}
        views = {iid: InstanceView(iid, "missing") for iid in ids}
        for start in range(0, len(ids), MAX_FILTER_VALUES):
            # A filter (not InstanceIds=) so an unknown id is simply absent, not an error.
            chunk = ids[start : start + MAX_FILTER_VALUES]
            views.update(self._instance_views([{"Name": "instance-id", "Values": chunk}]))
        return views

    def describe_instances_of_jobs(self, instance_ids: Iterable[str]) -> dict[str, InstanceView]:
        """Like :meth:`describe_instances`, for many jobs at once (the sweep).

        One paginated call by the job tag, up to 1,000 instances a page, however many
        jobs there are; only asked ids the tag did not find (an instance spotctl did not
        tag, or one EC2 forgot) are looked up by id.
        """
        ids = set(instance_ids)
        if not ids:
            return {}
        tagged = self._instance_views(
            [{"Name": "tag-key", "Values": [JOB_TAG]}], page_size=INSTANCES_PAGE
        )
        views = {iid: view for iid, view in tagged.items() if iid in ids}
        views.update(self.describe_instances(ids - views.keys()))
        return views

    def _instance_views(
        self, filters: Any, page_size: int | None = None
    ) -> dict[str, InstanceView]:
        views: dict[str, InstanceView] = {}
        paginator = self._client.get_paginator("describe_instances")
        config: PaginatorConfigTypeDef = {"PageSize": page_size} if page_size else {}
        for page in paginator.paginate(Filters=filters, PaginationConfig=config):
            for reservation in page.get("Reservations", []):
                for instance in reservation.get("Instances", []):
                    iid = instance["InstanceId"]
                    views[iid] = InstanceView(
                        iid,
                        instance["State"]["Name"],
                        instance.get("Placement", {}).get("AvailabilityZone", ""),
                        instance.get("StateReason", {}).get("Code", ""),
                    )
        return views

    def launched_for(self, job_id: str, attempt: int) -> dict[str, tuple[str, str]]:
        """Live instances tagged with this job and attempt: id -> (instance type, AZ).

        Tags are applied by RunInstances itself (TagSpecifications), so an instance a
        dead Lambda launched is findable even though no record names it.
        """
        found: dict[str, tuple[str, str]] = {}
        paginator = self._client.get_paginator("describe_instances")
        pages = paginator.paginate(
            Filters=[
                {"Name": "tag:spotctl:job-id", "Values": [job_id]},
                {"Name": "tag:spotctl:attempt", "Values": [str(attempt)]},
                {"Name": "instance-state-name", "Values": ["pending", "running"]},
            ]
        )
        for page in pages:
            for reservation in page.get("Reservations", []):
                for instance in reservation.get("Instances", []):
                    found[instance["InstanceId"]] = (
                        instance["InstanceType"],
                        instance.get("Placement", {}).get("AvailabilityZone", ""),
                    )
        return found

    def live_instances_tagged(self, tag_key: str) -> dict[str, datetime]:
        """Pending or running instances carrying ``tag_key``: id -> launch time."""
        found: dict[str, datetime] = {}
        paginator = self._client.get_paginator("describe_instances")
        filters: Any = [
            {"Name": "tag-key", "Values": [tag_key]},
            {"Name": "instance-state-name", "Values": ["pending", "running"]},
        ]
        for page in paginator.paginate(Filters=filters):
            for reservation in page.get("Reservations", []):
                for instance in reservation.get("Instances", []):
                    found[instance["InstanceId"]] = instance["LaunchTime"]
        return found

    def describe_volume(self, volume_id: str) -> VolumeView:
        response = self._client.describe_volumes(
            Filters=[{"Name": "volume-id", "Values": [volume_id]}]
        )
        volumes = response.get("Volumes", [])
        if not volumes:
            return VolumeView(volume_id, "missing")
        return _volume_view(volumes[0])

    def describe_volumes_of_jobs(self, volume_ids: Iterable[str]) -> dict[str, VolumeView]:
        """Every asked volume's view (``missing`` if EC2 does not know it), for the sweep.

        One paginated call by the job tag for the volumes spotctl created; the rest
        (volumes a job adopted, which carry no tag of ours) by id, 200 a call.
        """
        ids = set(volume_ids)
        if not ids:
            return {}
        tagged = self._volume_views(
            [{"Name": "tag-key", "Values": [JOB_TAG]}], page_size=VOLUMES_PAGE
        )
        views = {vid: view for vid, view in tagged.items() if vid in ids}
        rest = sorted(ids - views.keys())
        for start in range(0, len(rest), MAX_FILTER_VALUES):
            chunk = rest[start : start + MAX_FILTER_VALUES]
            views.update(self._volume_views([{"Name": "volume-id", "Values": chunk}]))
        for vid in ids - views.keys():
            views[vid] = VolumeView(vid, "missing")
        return views

    def _volume_views(self, filters: Any, page_size: int | None = None) -> dict[str, VolumeView]:
        views: dict[str, VolumeView] = {}
        paginator = self._client.get_paginator("describe_volumes")
        config: PaginatorConfigTypeDef = {"PageSize": page_size} if page_size else {}
        for page in paginator.paginate(Filters=filters, PaginationConfig=config):
            for volume in page.get("Volumes", []):
                views[volume["VolumeId"]] = _volume_view(volume)
        return views

    def describe_snapshot(self, snapshot_id: str) -> SnapshotView:
        response = self._client.describe_snapshots(
            OwnerIds=["self"], Filters=[{"Name": "snapshot-id", "Values": [snapshot_id]}]
        )
        snapshots = response.get("Snapshots", [])
        if not snapshots:
            return SnapshotView(snapshot_id, "missing")
        return SnapshotView(snapshot_id, snapshots[0]["State"])

    def snapshot_size(self, snapshot_id: str) -> int | None:
        """The GiB of the volume the snapshot was taken of (the least a volume made from
        it can have), or None when this account cannot see it (its own, shared or
        public ones it can)."""
        try:
            response = self._client.describe_snapshots(SnapshotIds=[snapshot_id])
        except ClientError as exc:
            if exc.response["Error"]["Code"] in _MISSING_CODES:
                return None
            _raise_typed(exc)
        snapshots = response.get("Snapshots", [])
        return int(snapshots[0].get("VolumeSize", 0)) if snapshots else None

    def snapshot_of_move(self, job_id: str, move: int) -> str | None:
        """The snapshot a (possibly dead) pass took for move ``move`` of ``job_id``."""
        response = self._client.describe_snapshots(
            OwnerIds=["self"],
            Filters=[
                {"Name": f"tag:{JOB_TAG}", "Values": [job_id]},
                {"Name": f"tag:{MOVE_TAG}", "Values": [str(move)]},
            ],
        )
        found = sorted(s["SnapshotId"] for s in response.get("Snapshots", []))
        return found[0] if found else None

    def spot_prices(
        self, instance_types: Sequence[str], azs: Sequence[str] | None, now: float
    ) -> dict[Pool, float]:
        """The current spot price of each (type, AZ) that EC2 offers."""
        kwargs: dict[str, Any] = {
            "InstanceTypes": list(instance_types),
            "ProductDescriptions": ["Linux/UNIX"],
            "StartTime": datetime.fromtimestamp(now, UTC),
        }
        if azs is not None and len(azs) == 1:
            kwargs["AvailabilityZone"] = azs[0]
        latest: dict[Pool, tuple[datetime, float]] = {}
        paginator = self._client.get_paginator("describe_spot_price_history")
        for page in paginator.paginate(**kwargs):
            for entry in page.get("SpotPriceHistory", []):
                pool = Pool(instance_type=entry["InstanceType"], az=entry["AvailabilityZone"])
                if azs is not None and pool.az not in azs:
                    continue
                stamp = entry["Timestamp"]
                if pool not in latest or stamp > latest[pool][0]:
                    latest[pool] = (stamp, float(entry["SpotPrice"]))
        return {pool: price for pool, (_, price) in latest.items()}

    # -- acting ------------------------------------------------------------------

    def run_instance(
        self, candidate: Candidate, settings: LaunchSettings, user_data: str, tags: dict[str, str]
    ) -> str:
        """Start one instance; the candidate's ClientToken makes a retry return it again."""
        ids = self.run_instances(
            candidate, settings, user_data, tags, count=1, client_token=candidate.client_token
        )
        return ids[0]

    def run_instances(
        self,
        candidate: Candidate,
        settings: LaunchSettings,
        user_data: str,
        tags: dict[str, str],
        *,
        count: int,
        client_token: str,
    ) -> list[str]:
        """Start up to ``count`` instances in the candidate's pool with one request.

        EC2 starts as many as it has capacity for (at least one, or it refuses); they
        come back in launch-index order. ``client_token`` makes a retry return them again.
        """
        kwargs: dict[str, Any] = {
            "ImageId": settings.ami_id,
            "InstanceType": candidate.pool.instance_type,
            "MinCount": 1,
            "MaxCount": count,
            "ClientToken": client_token,
            "UserData": user_data,  # botocore base64-encodes it for RunInstances
            # The agent shuts the instance down when the workload ends: terminate it.
            "InstanceInitiatedShutdownBehavior": "terminate",
            # IMDSv2 only; hop limit 2 so a container on a bridge network can reach it.
            # Tags in the metadata: how the agent learns it is asked to leave (LEAVE_TAG).
            "MetadataOptions": {
                "HttpTokens": "required",
                "HttpPutResponseHopLimit": 2,
                "HttpEndpoint": "enabled",
                "InstanceMetadataTags": "enabled",
            },
            "TagSpecifications": _tags("instance", tags),
        }
        subnet = settings.subnets.get(candidate.pool.az)
        if subnet:
            kwargs["SubnetId"] = subnet
        else:
            kwargs["Placement"] = {"AvailabilityZone": candidate.pool.az}
        if settings.security_groups:
            kwargs["SecurityGroupIds"] = list(settings.security_groups)
        if settings.instance_profile:
            kwargs["IamInstanceProfile"] = {"Name": settings.instance_profile}
        if candidate.market == "spot":
            spot: dict[str, Any] = {
                "SpotInstanceType": "one-time",
                "InstanceInterruptionBehavior": "terminate",
            }
            if candidate.max_price is not None:
                spot["MaxPrice"] = f"{candidate.max_price:.4f}"
            kwargs["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": spot}
        try:
            response = self._client.run_instances(**kwargs)
        except ClientError as exc:
            _raise_typed(exc)
        launched = sorted(response["Instances"], key=lambda i: i.get("AmiLaunchIndex", 0))
        return [instance["InstanceId"] for instance in launched]

    def create_volume(
        self,
        az: str,
        size_gib: int | None,
        snapshot_id: str | None,
        client_token: str,
        tags: dict[str, str],
    ) -> str:
        kwargs: dict[str, Any] = {
            "AvailabilityZone": az,
            "VolumeType": "gp3",
            "Encrypted": True,
            "ClientToken": client_token,
            "TagSpecifications": _tags("volume", tags),
        }
        if size_gib is not None:
            kwargs["Size"] = size_gib
        if snapshot_id is not None:
            kwargs["SnapshotId"] = snapshot_id
        try:
            response = self._client.create_volume(**kwargs)
        except ClientError as exc:
            _raise_typed(exc)
        return response["VolumeId"]

    def create_snapshot(self, volume_id: str, tags: dict[str, str]) -> str:
        try:
            response = self._client.create_snapshot(
                VolumeId=volume_id,
                Description=f"spotctl move of {volume_id}",
                TagSpecifications=_tags("snapshot", tags),
            )
        except ClientError as exc:
            _raise_typed(exc)
        return response["SnapshotId"]

    def attach_volume(self, volume_id: str, instance_id: str) -> None:
        try:
            self._client.attach_volume(
                VolumeId=volume_id, InstanceId=instance_id, Device=DATA_DEVICE
            )
        except ClientError as exc:
            _raise_typed(exc)

    def terminate(self, instance_ids: Iterable[str]) -> None:
        ids = sorted(set(instance_ids))
        if not ids:
            return
        try:
            self._client.terminate_instances(InstanceIds=ids)
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "InvalidInstanceID.NotFound":
                _raise_typed(exc)
            if len(ids) > 1:
                # EC2 refuses the whole request for one id it does not know (long gone,
                # or not visible yet): the others must still go.
                for instance_id in ids:
                    self.terminate([instance_id])

    def ask_to_leave(self, instance_id: str, at: str) -> None:
        """Tag the instance with ``LEAVE_TAG`` (value ``at``); an instance already gone
        needs no asking."""
        try:
            self._client.create_tags(
                Resources=[instance_id], Tags=[{"Key": LEAVE_TAG, "Value": at}]
            )
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "InvalidInstanceID.NotFound":
                _raise_typed(exc)

    def delete_volume(self, volume_id: str) -> None:
        try:
            self._client.delete_volume(VolumeId=volume_id)
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "InvalidVolume.NotFound":
                _raise_typed(exc)
