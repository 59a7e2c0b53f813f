"""Helpers shared by the benchmark scripts: where the shared files are, and the machine's description."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BITSEARCH_SHARED", ROOT.parent / "shared"))
RESNET20 = SHARED / "models" / "resnet20-cifar10.th"
CIFAR_TRAIN = SHARED / "data" / "cifar10-jpeg" / "train.npz"
CIFAR_TEST = SHARED / "data" / "cifar10-jpeg" / "test.npz"
RESULTS = ROOT / "bench" / "results"


def require_shared(*paths: Path) -> None:
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        sys.exit(f"missing shared files: {', '.join(missing)} (set BITSEARCH_SHARED to the shared folder)")


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )


def write_result(name: str, text: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(text)
    return path


def write_results(name: str, text: str, data: Any) -> Path:
    """The result `name` (a .md file) and its data beside it (the same name, .json); returns the .md path."""
    write_result(name.replace(".md", ".json"), json.dumps(data, indent=1, default=str) + "\n")
    return write_result(name, text)


def run_footer(script: str, seconds: float) -> list[str]:
    """Result lines saying how it was made: this run's command line, its seconds, the machine and the load
    average at the end (the benchmarks share the machine with other jobs)."""
    load = os.getloadavg()
    cmd = f"python bench/{script}" + "".join(f" {a}" for a in sys.argv[1:])
    return [
        f"Command: `.venv/bin/{cmd}` ({seconds:.0f} s in all).",
        "",
        f"Machine: {machine()}; shared with other jobs (load average at the end "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}).",
    ]


def acc_cell(correct: np.ndarray) -> str:
    """Top-1 of per-item 0/1 correctness, with its 95 % Wilson interval, in percent."""
    from search.selection import mean_interval  # the repository root is on the path by now

    lo, hi = mean_interval(correct.astype(float), 0.95, 100.0)
    return f"{100 * correct.mean():.2f} [{lo:.1f}, {hi:.1f}]"


def paired(a: np.ndarray, b: np.ndarray, n: int = 2000) -> str:
    """Mean of a − b (per-item 0/1 correctness) in points, with a 95 % paired bootstrap interval."""
    rng = np.random.default_rng(0)
    d = a.astype(float) - b.astype(float)
    boots = [d[rng.integers(0, len(d), len(d))].mean() * 100 for _ in range(n)]
    return f"{d.mean() * 100:+.2f} [{np.percentile(boots, 2.5):+.2f}, {np.percentile(boots, 97.5):+.2f}]"
