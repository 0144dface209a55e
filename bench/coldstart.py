"""Cold start: the time to import the Lambda module (``app``) in a fresh interpreter,
the median of several runs, and the imports that dominate it (``-X importtime``).

    .venv/bin/python -m bench.coldstart [--runs 10]

Writes bench/results/coldstart.json and prints the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
RESULTS = Path(__file__).parent / "results"
# What the Lambda's environment sets (see .chalice/config.json).
LAMBDA_ENV = {"PYDANTIC_DISABLE_PLUGINS": "__all__", "POWERTOOLS_SERVICE_NAME": "spotctl"}
_TIMED_IMPORT = "import time; t = time.perf_counter(); import app; print(time.perf_counter() - t)"


def import_ms(env: dict[str, str]) -> float:
    out = subprocess.run(
        [sys.executable, "-c", _TIMED_IMPORT], cwd=ROOT, env=env, capture_output=True, check=True
    )
    return float(out.stdout.decode().strip()) * 1000


def heaviest_imports(env: dict[str, str], top: int = 12) -> list[tuple[str, float]]:
    """Top-level packages by cumulative import time (ms)."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import app"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        check=True,
    )
    totals: dict[str, float] = {}
    for line in out.stderr.decode().splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = (part.strip() for part in line.split("|"))
        if not cumulative.isdigit():
            continue
        depth = (len(name) - len(name.lstrip())) // 2
        if depth <= 1:  # app itself and what it imports directly
            root = name.strip().split(".")[0]
            totals[root] = max(totals.get(root, 0.0), int(cumulative) / 1000)
    return sorted(totals.items(), key=lambda item: -item[1])[:top]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args(argv)
    env = {**os.environ, **LAMBDA_ENV}
    import_ms(env)  # warm the file system cache, as a Lambda image would be
    samples = [import_ms(env) for _ in range(args.runs)]
    result = {
        "runs": args.runs,
        "median_ms": round(statistics.median(samples), 1),
        "min_ms": round(min(samples), 1),
        "max_ms": round(max(samples), 1),
        "heaviest_imports_ms": dict(heaviest_imports(env)),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "coldstart.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
