#!/usr/bin/env python3
"""A small, real training job that follows the spotctl workload contract.

It trains a two-layer network on scikit-learn's bundled handwritten digits (shipped
with the package, nothing is downloaded) with minibatch SGD in numpy, on CPU, and:

- checkpoints every --checkpoint-every steps into $SPOTCTL_CHECKPOINT_DIR, atomically:
  write "<name>.tmp", fsync, rename, fsync the directory;
- resumes from the newest checkpoint it can read (a damaged one is skipped);
- on SIGTERM finishes the step in progress, checkpoints, and exits 143;
- with --crash-once-at-step N, exits 1 the first time it reaches step N (a marker in the
  checkpoint directory remembers), to show a restart on errors resuming the work;
- is deterministic: the minibatch of step s depends only on (seed, s), and everything
  else is in the checkpoint, so a run interrupted and resumed any number of times ends
  with weights bit-identical to a run that never stopped.

At the end it prints "weights_sha256=<hex>" and writes final.json beside the checkpoints.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.datasets import load_digits

CHECKPOINT = re.compile(r"ckpt-(\d{8})\.npz")
WEIGHTS = ("w1", "b1", "w2", "b2")
EXIT_STOPPED = 128 + signal.SIGTERM  # what a shell reports for death by SIGTERM
EXIT_CRASHED = 1
CRASHED = "crashed-once"  # marks that --crash-once-at-step has crashed already


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument(
        "--checkpoint-dir",
        default=os.environ.get("SPOTCTL_CHECKPOINT_DIR", "checkpoints"),
        help="default: $SPOTCTL_CHECKPOINT_DIR, else ./checkpoints",
    )
    parser.add_argument("--keep", type=int, default=3, help="checkpoints kept locally")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--step-delay", type=float, default=0.0, help="seconds of sleep per step (demos, tests)"
    )
    parser.add_argument(
        "--crash-once-at-step",
        type=int,
        default=None,
        help="exit 1 on reaching this step, once per checkpoint directory (demos, tests)",
    )
    return parser.parse_args(argv)


def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    digits = load_digits()
    x = digits.data.astype(np.float64) / 16.0
    y = digits.target.astype(np.int64)
    return x[:1500], y[:1500], x[1500:], y[1500:]


def initial_weights(seed: int, n_in: int, hidden: int, n_out: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w1": rng.normal(0.0, 1.0 / np.sqrt(n_in), (n_in, hidden)),
        "b1": np.zeros(hidden),
        "w2": rng.normal(0.0, 1.0 / np.sqrt(hidden), (hidden, n_out)),
        "b2": np.zeros(n_out),
    }


def sgd_step(
    w: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, lr: float
) -> dict[str, np.ndarray]:
    """One step of softmax cross-entropy through a tanh hidden layer."""
    h = np.tanh(x @ w["w1"] + w["b1"])
    logits = h @ w["w2"] + w["b2"]
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    d_logits = p / len(y)
    d_h = (d_logits @ w["w2"].T) * (1.0 - h**2)
    grads = {
        "w2": h.T @ d_logits,
        "b2": d_logits.sum(axis=0),
        "w1": x.T @ d_h,
        "b1": d_h.sum(axis=0),
    }
    return {k: w[k] - lr * grads[k] for k in WEIGHTS}


def accuracy(w: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    h = np.tanh(x @ w["w1"] + w["b1"])
    return float(((h @ w["w2"] + w["b2"]).argmax(axis=1) == y).mean())


def weights_sha256(w: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for k in WEIGHTS:
        digest.update(np.ascontiguousarray(w[k]).tobytes())
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, write: Any) -> None:
    """write(f) into "<path>.tmp", then fsync and rename it over path."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def save_checkpoint(directory: Path, step: int, w: dict[str, np.ndarray], keep: int) -> None:
    path = directory / f"ckpt-{step:08d}.npz"
    write_atomically(path, lambda f: np.savez(f, step=np.int64(step), **w))
    for old in sorted(checkpoints(directory))[:-keep]:
        old[1].unlink(missing_ok=True)
    print(f"checkpoint step={step} {path.name}", flush=True)


def checkpoints(directory: Path) -> list[tuple[int, Path]]:
    found = [CHECKPOINT.fullmatch(p.name) for p in directory.iterdir()]
    return sorted((int(m[1]), directory / m[0]) for m in found if m)


def resume(directory: Path) -> tuple[int, dict[str, np.ndarray]] | None:
    for step, path in reversed(checkpoints(directory)):
        try:
            with np.load(path) as data:
                if int(data["step"]) != step:
                    raise ValueError("step in file does not match its name")
                return step, {k: data[k].copy() for k in WEIGHTS}
        except (OSError, ValueError, KeyError) as exc:
            print(f"skipping unreadable checkpoint {path.name}: {exc}", flush=True)
    return None


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    directory = Path(args.checkpoint_dir)
    directory.mkdir(parents=True, exist_ok=True)
    stop = {"requested": False}

    def on_sigterm(signum: int, frame: object) -> None:
        stop["requested"] = True  # act on it between steps, never inside a write

    signal.signal(signal.SIGTERM, on_sigterm)

    x_train, y_train, x_test, y_test = load_data()
    resumed = resume(directory)
    if resumed is None:
        step = 0
        w = initial_weights(args.seed, x_train.shape[1], args.hidden, 10)
        print("starting from scratch", flush=True)
    else:
        step, w = resumed
        print(f"resumed from step {step}", flush=True)

    while step < args.steps:
        if stop["requested"]:
            save_checkpoint(directory, step, w, args.keep)
            print(f"SIGTERM: stopped at step {step}", flush=True)
            return EXIT_STOPPED
        batch = np.random.default_rng([args.seed, step]).choice(
            len(y_train), size=args.batch_size, replace=False
        )
        w = sgd_step(w, x_train[batch], y_train[batch], args.lr)
        step += 1
        if step % args.checkpoint_every == 0 or step == args.steps:
            save_checkpoint(directory, step, w, args.keep)
        if step == args.crash_once_at_step and not (directory / CRASHED).exists():
            (directory / CRASHED).write_text(f"{step}\n")
            print(f"crashing at step {step}, as asked (--crash-once-at-step)", flush=True)
            return EXIT_CRASHED
        if args.step_delay:
            time.sleep(args.step_delay)

    result = {
        "steps": step,
        "weights_sha256": weights_sha256(w),
        "test_accuracy": accuracy(w, x_test, y_test),
    }
    write_atomically(directory / "final.json", lambda f: f.write(json.dumps(result).encode()))
    print(f"test_accuracy={result['test_accuracy']:.4f}", flush=True)
    print(f"weights_sha256={result['weights_sha256']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
