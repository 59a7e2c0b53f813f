"""Helpers shared by the benchmark scripts: where the shared files are, and the machine's description."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

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
