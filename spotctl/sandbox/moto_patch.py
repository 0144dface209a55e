"""What moto lacks to play a GPU spot cloud: the instance types the traces name.

And what makes moto slow at a thousand jobs, fixed without changing its answers
(``speed_up_moto()``): its server lists its package directory, and its dispatcher
inspects the whole response class, on every request; it finds an EC2 resource's tags
by scanning every tag of the account, so a describe is O(resources * tags); a
DescribeInstances copies every reservation of the account before filtering; and a
DynamoDB transaction deep-copies every table it touches for its rollback, so a write
costs O(table).

moto 5.2.5's instance type catalogue has no p2 or p3 types (the traces' K80 and V100
machines), so ``DescribeInstanceTypes``/``DescribeInstanceTypeOfferings`` would not list
them. ``add_gpu_instance_types()`` adds them to moto's in-memory catalogue and offerings,
in every region moto knows and every AZ of it. It only adds entries, is idempotent, and
leaves moto's switch ``MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION`` alone: the sandbox
proxy validates instance types itself against this catalogue (see ``known_instance_type``).

Two helpers reach into moto's in-process state: ``instance_metadata_tags`` reads an
instance's tags as its IMDS serves them, ``set_launch_time`` puts its launch time on the
sandbox clock.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import moto.core.responses as moto_responses
import moto.dynamodb.models as moto_dynamodb
import moto.ec2.models.instances as moto_instances
import moto.ec2.utils as moto_ec2_utils
from moto import backends as moto_backends
from moto.dynamodb.models.dynamo_type import DynamoType
from moto.dynamodb.models.table import Table
from moto.ec2.models import instance_types as moto_instance_types
from moto.ec2.models.core import TaggedEC2Resource
from moto.ec2.utils import EC2_PREFIX_TO_RESOURCE, get_prefix

# name: (vCPUs, memory MiB, GPU count, GPU name, memory MiB per GPU)
GPU_INSTANCE_SPECS: dict[str, tuple[int, int, int, str, int]] = {
    "p2.xlarge": (4, 62464, 1, "K80", 12288),
    "p2.8xlarge": (32, 499712, 8, "K80", 12288),
    "p2.16xlarge": (64, 749568, 16, "K80", 12288),
    "p3.2xlarge": (8, 62464, 1, "V100", 16384),
    "p3.8xlarge": (32, 249856, 4, "V100", 16384),
    "p3.16xlarge": (64, 499712, 8, "V100", 16384),
}
_TEMPLATE = "p3dn.24xlarge"
_lock = threading.Lock()


def _describe(name: str, template: dict[str, Any]) -> dict[str, Any]:
    vcpus, memory, gpus, gpu_name, gpu_memory = GPU_INSTANCE_SPECS[name]
    spec = copy.deepcopy(template)
    spec.pop("InstanceStorageInfo", None)
    spec.update(
        {
            "InstanceType": name,
            "CurrentGeneration": name.startswith("p3"),
            "Hypervisor": "xen",
            "InstanceStorageSupported": False,
            "MemoryInfo": {"SizeInMiB": memory},
            "VCpuInfo": {
                "DefaultVCpus": vcpus,
                "DefaultCores": vcpus // 2,
                "DefaultThreadsPerCore": 2,
                "ValidCores": list(range(2, vcpus // 2 + 1, 2)),
                "ValidThreadsPerCore": [1, 2],
            },
            "GpuInfo": {
                "Gpus": [
                    {
                        "Count": gpus,
                        "Manufacturer": "NVIDIA",
                        "Name": gpu_name,
                        "MemoryInfo": {"SizeInMiB": gpu_memory},
                    }
                ],
                "TotalGpuMemoryInMiB": gpus * gpu_memory,
            },
        }
    )
    return spec


def add_gpu_instance_types() -> None:
    """Teach moto the p2/p3 instance types (idempotent)."""
    with _lock:
        catalogue = moto_instance_types.INSTANCE_TYPES
        offerings = moto_instance_types.INSTANCE_TYPE_OFFERINGS
        backend_types = moto_instance_types.InstanceTypeBackend.instance_types
        for name in GPU_INSTANCE_SPECS:
            if name in catalogue:
                continue
            catalogue[name] = _describe(name, catalogue[_TEMPLATE])
            backend_types.append(moto_instance_types.InstanceType(name))
            # First in the lists: RunInstances checks the type against the region's
            # offerings one by one (thousands), on every launch.
            for region, region_offers in offerings["region"].items():
                region_offers.insert(
                    0, {"InstanceType": name, "Location": region, "LocationType": "region"}
                )
                zones = offerings["availability-zone"].get(region, [])
                for az in sorted({offer["Location"] for offer in zones}, reverse=True):
                    zones.insert(
                        0,
                        {"InstanceType": name, "Location": az, "LocationType": "availability-zone"},
                    )


def known_instance_type(name: str) -> bool:
    return name in moto_instance_types.INSTANCE_TYPES


_sped_up = False


def speed_up_moto() -> None:
    """Patch moto's three per-request costs that grow with the account (idempotent)."""
    global _sped_up  # noqa: PLW0603 - patched once per process
    with _lock:
        if _sped_up:
            return
        modules = tuple(moto_backends.list_of_moto_modules())

        def listed() -> Iterable[str]:
            return modules

        moto_backends.list_of_moto_modules = listed
        TaggedEC2Resource.get_tags = _tags_of  # type: ignore[method-assign,assignment]
        _patch_transactions()
        _patch_dispatch()
        _patch_reservations()
        _sped_up = True


def _tags_of(resource: Any) -> list[dict[str, str]]:
    """What ``describe_tags(filters={"resource-id": [id]})`` answers, by one lookup."""
    resource_id = resource.id
    if not resource_id:
        return []
    tags = resource.ec2_backend.tags.get(resource_id)  # a defaultdict: get() adds nothing
    if not tags:
        return []
    kind = EC2_PREFIX_TO_RESOURCE.get(get_prefix(resource_id), "")
    return [
        {"resource_id": resource_id, "key": k, "value": v, "resource_type": kind}
        for k, v in list(tags.items())
    ]


_in_transaction = threading.local()


class _TableCopyShim:
    """moto's ``copy`` module for its DynamoDB models: inside a transaction a table's
    deep copy (its rollback backup) is the table itself; the items the transaction
    touches are backed up instead, by ``_transact_write_items``."""

    def __getattr__(self, name: str) -> Any:
        return getattr(copy, name)

    @staticmethod
    def deepcopy(value: Any, memo: dict[int, Any] | None = None) -> Any:
        if isinstance(value, Table) and getattr(_in_transaction, "active", False):
            return value
        return copy.deepcopy(value, memo)


def _patch_transactions() -> None:
    backend_class = moto_dynamodb.DynamoDBBackend
    original = backend_class.transact_write_items

    def transact_write_items(self: Any, transact_items: list[dict[str, Any]]) -> None:
        saved = [_item_backup(self, entry) for entry in transact_items]
        _in_transaction.active = True
        try:
            original(self, transact_items)
        except Exception:
            for backup in reversed(saved):
                if backup is not None:
                    _restore(*backup)
            raise
        finally:
            _in_transaction.active = False

    moto_dynamodb.copy = _TableCopyShim()  # type: ignore[attr-defined,assignment]
    backend_class.transact_write_items = transact_write_items  # type: ignore[method-assign]


def _item_backup(backend: Any, entry: dict[str, Any]) -> tuple[Any, ...] | None:
    """(table, hash key, range key, a copy of the item or None) for one operation."""
    if len(entry) != 1:
        return None
    op_type, op = next(iter(entry.items()))
    table = backend.tables.get(op.get("TableName"))
    attrs = op.get("Item") if op_type == "Put" else op.get("Key")
    if table is None or not isinstance(attrs, dict) or table.hash_key_attr not in attrs:
        return None
    hash_value = DynamoType(attrs[table.hash_key_attr])
    range_value = None
    if table.range_key_attr is not None:
        if table.range_key_attr not in attrs:
            return None
        range_value = DynamoType(attrs[table.range_key_attr])
    current = table.get_item(hash_value, range_value)
    return table, hash_value, range_value, copy.deepcopy(current)


def _restore(table: Any, hash_value: Any, range_value: Any, item: Any) -> None:
    if range_value is not None:
        if item is None:
            table.items[hash_value].pop(range_value, None)
        else:
            table.items[hash_value][range_value] = item
    elif item is None:
        table.items.pop(hash_value, None)
    else:
        table.items[hash_value] = item


def _patch_dispatch() -> None:
    names: dict[type, list[str]] = {}
    module: dict[str, Any] = vars(moto_responses)  # it imports the function by name
    original = module["method_names_from_class"]

    def method_names_from_class(clazz: Any) -> list[str]:
        if clazz not in names:
            names[clazz] = original(clazz)
        return list(names[clazz])

    module["method_names_from_class"] = method_names_from_class


def _patch_reservations() -> None:
    backend_class = moto_instances.InstanceBackend
    original = backend_class.all_reservations

    def all_reservations(self: Any, filters: Any = None) -> list[Any]:
        ids = (filters or {}).get("instance-id")
        if not ids or any("*" in i or "?" in i for i in ids):
            return original(self, filters)
        # Only reservations holding an asked id can pass the filter: copy just those.
        wanted = set(ids)
        reservations = [
            copy.copy(r)
            for r in self.reservations.copy().values()
            if any(i.id in wanted for i in r.instances)
        ]
        return moto_ec2_utils.filter_reservations(reservations, filters)

    backend_class.all_reservations = all_reservations  # type: ignore[method-assign]


def instance_metadata_tags(account: str, region: str, instance_id: str) -> dict[str, str] | None:
    """The instance's tags as moto holds them now, or None when moto has no such instance
    or its metadata options (at launch, or changed since) keep tags out of IMDS."""
    backend = moto_backends.get_backend("ec2")[account][region]
    # A copy: a launch on another thread may add a reservation meanwhile.
    for reservation in backend.reservations.copy().values():
        for instance in reservation.instances:
            if instance.id != instance_id:
                continue
            if instance.metadata_options.instance_metadata_tags != "enabled":
                return None
            return dict(backend.tags.get(instance_id) or {})  # get(): adds no entry
    return None


def set_launch_time(account: str, region: str, instance_id: str, at: float) -> None:
    """Stamp an instance's LaunchTime with ``at`` (epoch seconds on the sandbox clock).

    moto stamps it with the wall clock, which a sandbox clock running faster than real
    time (or set by a test) leaves behind; EC2's LaunchTime and the Lambdas' clock
    agree, and code that ages instances (the sweep's reaper) relies on it.
    """
    backend = moto_backends.get_backend("ec2")[account][region]
    instance = backend.get_instance(instance_id)
    instance.launch_time = datetime.fromtimestamp(at, UTC).replace(tzinfo=None)
