"""What moto lacks to play a GPU spot cloud: the instance types the traces name.

moto 5.2.5's instance type catalogue has no p2 or p3 types (the traces' K80 and V100
machines), so ``DescribeInstanceTypes``/``DescribeInstanceTypeOfferings`` would not list
them. ``add_gpu_instance_types()`` adds them to moto's in-memory catalogue and offerings,
in every region moto knows and every AZ of it. It only adds entries, is idempotent, and
leaves moto's switch ``MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION`` alone: the sandbox
proxy validates instance types itself against this catalogue (see ``known_instance_type``).
"""

from __future__ import annotations

import copy
import threading
from typing import Any

from moto.ec2.models import instance_types as moto_instance_types

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
            for region, region_offers in offerings["region"].items():
                region_offers.append(
                    {"InstanceType": name, "Location": region, "LocationType": "region"}
                )
                zones = offerings["availability-zone"].get(region, [])
                for az in sorted({offer["Location"] for offer in zones}):
                    zones.append(
                        {"InstanceType": name, "Location": az, "LocationType": "availability-zone"}
                    )


def known_instance_type(name: str) -> bool:
    return name in moto_instance_types.INSTANCE_TYPES
