"""On-demand prices: the default spot max price and the yardstick for savings.

Source: Amazon EC2 On-Demand pricing page (aws.amazon.com/ec2/pricing/on-demand/),
Linux, US East (N. Virginia), USD per instance-hour. Other regions differ by a few
per cent; the table is what the job's default max price and "cost on on-demand"
figures use, so a deployment outside us-east-1 may override it per job with
``max_price_per_hour``.
"""

from __future__ import annotations

ON_DEMAND_USD_PER_HOUR: dict[str, float] = {
    # NVIDIA V100 (the traces' p3 family)
    "p3.2xlarge": 3.06,
    "p3.8xlarge": 12.24,
    "p3.16xlarge": 24.48,
    "p3dn.24xlarge": 31.212,
    # NVIDIA K80 (the traces' p2 family)
    "p2.xlarge": 0.90,
    "p2.8xlarge": 7.20,
    "p2.16xlarge": 14.40,
    # NVIDIA T4
    "g4dn.xlarge": 0.526,
    "g4dn.2xlarge": 0.752,
    "g4dn.4xlarge": 1.204,
    "g4dn.8xlarge": 2.176,
    "g4dn.12xlarge": 3.912,
    "g4dn.16xlarge": 4.352,
    # NVIDIA A10G
    "g5.xlarge": 1.006,
    "g5.2xlarge": 1.212,
    "g5.4xlarge": 1.624,
    "g5.8xlarge": 2.448,
    "g5.12xlarge": 5.672,
    "g5.16xlarge": 4.096,
    "g5.24xlarge": 8.144,
    "g5.48xlarge": 16.288,
    # NVIDIA A100
    "p4d.24xlarge": 32.7726,
    # CPU types, for small jobs and tests
    "m5.large": 0.096,
    "m5.xlarge": 0.192,
    "c5.xlarge": 0.17,
    "c5.2xlarge": 0.34,
}

GPU_FAMILIES = ("p2", "p3", "p3dn", "p4d", "g4dn", "g5")


def on_demand_price(instance_type: str) -> float:
    """The on-demand $/h of a type; KeyError names the type when we do not know it."""
    return ON_DEMAND_USD_PER_HOUR[instance_type]


def has_gpu(instance_type: str) -> bool:
    return instance_type.split(".", 1)[0] in GPU_FAMILIES
