"""EBS rules moto does not enforce: AZ, in-use, instance state, and a slow detach."""

from __future__ import annotations

from typing import Any

import pytest
from botocore.exceptions import ClientError

from spotctl.sandbox import LocalCloud

from .conftest import launch, volume_in


def code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


def volume(ec2: Any, volume_id: str) -> dict[str, Any]:
    found: dict[str, Any] = ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"][0]
    return found


def test_attach_in_other_az_fails_like_aws(ec2: Any) -> None:
    instance_id = launch(ec2, az="us-east-1a", spot=False)
    other_az = volume_in(ec2, az="us-east-1b")
    with pytest.raises(ClientError) as exc:
        ec2.attach_volume(VolumeId=other_az, InstanceId=instance_id, Device="/dev/sdf")
    assert code(exc) == "InvalidVolume.ZoneMismatch"
    assert volume(ec2, other_az)["State"] == "available"


def test_attach_of_volume_in_use_to_second_instance_fails_with_volume_in_use(ec2: Any) -> None:
    first = launch(ec2, spot=False)
    second = launch(ec2, spot=False)
    data = volume_in(ec2)
    ec2.attach_volume(VolumeId=data, InstanceId=first, Device="/dev/sdf")
    with pytest.raises(ClientError) as exc:
        ec2.attach_volume(VolumeId=data, InstanceId=second, Device="/dev/sdf")
    assert code(exc) == "VolumeInUse"
    attachments = volume(ec2, data)["Attachments"]
    assert [a["InstanceId"] for a in attachments] == [first]


def test_attach_to_terminated_instance_fails_with_incorrect_state(ec2: Any) -> None:
    instance_id = launch(ec2, spot=False)
    ec2.terminate_instances(InstanceIds=[instance_id])
    data = volume_in(ec2)
    with pytest.raises(ClientError) as exc:
        ec2.attach_volume(VolumeId=data, InstanceId=instance_id, Device="/dev/sdf")
    assert code(exc) == "IncorrectState"


def test_detached_volume_stays_detaching_until_delay_elapses(cloud: LocalCloud, ec2: Any) -> None:
    old, new = launch(ec2, spot=False), launch(ec2, spot=False)
    data = volume_in(ec2)
    ec2.attach_volume(VolumeId=data, InstanceId=old, Device="/dev/sdf")
    ec2.detach_volume(VolumeId=data)  # no InstanceId: EC2 does not need one
    seen = volume(ec2, data)
    assert seen["State"] == "in-use"
    assert [(a["InstanceId"], a["State"]) for a in seen["Attachments"]] == [(old, "detaching")]
    with pytest.raises(ClientError) as exc:
        ec2.attach_volume(VolumeId=data, InstanceId=new, Device="/dev/sdf")
    assert code(exc) == "VolumeInUse"
    with pytest.raises(ClientError) as exc:
        ec2.delete_volume(VolumeId=data)
    assert code(exc) == "VolumeInUse"
    cloud.advance(29)
    assert volume(ec2, data)["State"] == "in-use"
    cloud.advance(1)
    assert volume(ec2, data)["State"] == "available"
    ec2.attach_volume(VolumeId=data, InstanceId=new, Device="/dev/sdf")
    assert volume(ec2, data)["Attachments"][0]["InstanceId"] == new


def test_volume_of_terminated_instance_detaches_only_after_delay(
    cloud: LocalCloud, ec2: Any
) -> None:
    old, new = launch(ec2, spot=False), launch(ec2, spot=False)
    data = volume_in(ec2)
    ec2.attach_volume(VolumeId=data, InstanceId=old, Device="/dev/sdf")
    ec2.terminate_instances(InstanceIds=[old])
    with pytest.raises(ClientError) as exc:
        ec2.attach_volume(VolumeId=data, InstanceId=new, Device="/dev/sdf")
    assert code(exc) == "VolumeInUse"
    cloud.advance(30)
    ec2.attach_volume(VolumeId=data, InstanceId=new, Device="/dev/sdf")


def test_status_filters_see_detaching_volume_as_in_use(cloud: LocalCloud, ec2: Any) -> None:
    instance_id = launch(ec2, spot=False)
    data, spare = volume_in(ec2), volume_in(ec2)
    ec2.attach_volume(VolumeId=data, InstanceId=instance_id, Device="/dev/sdf")
    ec2.detach_volume(VolumeId=data)

    def ids(filters: list[dict[str, Any]]) -> set[str]:
        return {v["VolumeId"] for v in ec2.describe_volumes(Filters=filters)["Volumes"]}

    assert ids([{"Name": "status", "Values": ["available"]}]) == {spare}
    in_use = ids([{"Name": "status", "Values": ["in-use"]}])  # with the root volume
    assert data in in_use and spare not in in_use
    assert ids([{"Name": "attachment.status", "Values": ["detaching"]}]) == {data}
    cloud.advance(30)
    assert ids([{"Name": "status", "Values": ["available"]}]) == {data, spare}


def test_force_detach_frees_volume_at_once(ec2: Any) -> None:
    instance_id = launch(ec2, spot=False)
    data = volume_in(ec2)
    ec2.attach_volume(VolumeId=data, InstanceId=instance_id, Device="/dev/sdf")
    ec2.detach_volume(VolumeId=data, Force=True)
    assert volume(ec2, data)["State"] == "available"


def test_a_volume_from_a_snapshot_is_at_least_the_snapshot_s_size(ec2: Any) -> None:
    source = ec2.create_volume(AvailabilityZone="us-east-1a", Size=10)["VolumeId"]
    snapshot = ec2.create_snapshot(VolumeId=source)["SnapshotId"]
    with pytest.raises(ClientError) as exc:
        ec2.create_volume(AvailabilityZone="us-east-1a", SnapshotId=snapshot, Size=5)
    assert code(exc) == "InvalidParameterValue"
    assert "minimum is 10GiB" in str(exc.value)
    for size in ({"Size": 10}, {"Size": 11}, {}):
        made = ec2.create_volume(AvailabilityZone="us-east-1a", SnapshotId=snapshot, **size)
        assert made["Size"] == size.get("Size", 10)


def test_a_device_name_in_use_on_the_instance_is_refused(ec2: Any) -> None:
    instance_id = launch(ec2, az="us-east-1a", spot=False)
    first, second = (
        ec2.create_volume(AvailabilityZone="us-east-1a", Size=10)["VolumeId"] for _ in range(2)
    )
    ec2.attach_volume(VolumeId=first, InstanceId=instance_id, Device="/dev/sdf")
    with pytest.raises(ClientError) as exc:
        ec2.attach_volume(VolumeId=second, InstanceId=instance_id, Device="/dev/sdf")
    assert code(exc) == "InvalidParameterValue"
    assert "Attachment point /dev/sdf is already in use" in str(exc.value)
    assert volume(ec2, first)["Attachments"][0]["InstanceId"] == instance_id  # unmoved
    assert ec2.attach_volume(VolumeId=second, InstanceId=instance_id, Device="/dev/sdg")
