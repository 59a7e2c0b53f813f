"""QAT checkpoints: what a checkpoint holds besides tensors (quantizer layouts, RNG states) and how it is read
and written (atomically; `torch.load(..., weights_only=True)` reads it). See `quant.qat.trainer`."""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import BitsearchError
from ..quantizers import Quantizer, make_quantizer
from .quantizers import LearnableQuantizer
from .recipe import RESUMABLE_CHANGES, QATRecipe

CHECKPOINT_NAME = "qat-checkpoint.pt"
CHECKPOINT_FORMAT = "bitsearch.qat-checkpoint"
CHECKPOINT_VERSION = 1


def read_checkpoint(path: Path, recipe: QATRecipe) -> dict[str, Any]:
    """The checkpoint at `path` (a file or its folder), checked against the resumed run's `recipe`."""
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise BitsearchError(f"checkpoint {path} does not exist")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BitsearchError(f"cannot read the QAT checkpoint {path}: {exc}") from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise BitsearchError(f"{path} is not a bitsearch QAT checkpoint")
    if ck.get("version") != CHECKPOINT_VERSION:
        raise BitsearchError(f"QAT checkpoint version {ck.get('version')!r} is not supported")
    saved = QATRecipe.from_dict(json.loads(ck["recipe"]))
    diff = [k for k in recipe.differences(saved) if k not in RESUMABLE_CHANGES]
    if diff:
        raise BitsearchError(
            f"the recipe differs from the checkpoint's in {diff}; a resumed run must use the same recipe "
            f"(only {list(RESUMABLE_CHANGES)} may change)"
        )
    return ck


def write_checkpoint(directory: Path, state: dict[str, Any]) -> Path:
    """Write `state` to `<directory>/qat-checkpoint.pt` atomically (a temporary file, then `os.replace`)."""
    path = directory / CHECKPOINT_NAME
    fd, tmp = tempfile.mkstemp(prefix=f".{CHECKPOINT_NAME}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _quantizer_spec(q: Quantizer) -> dict[str, Any]:
    if isinstance(q, LearnableQuantizer):
        return q.spec()
    return {"name": q.name, "bits": q.bits, "per_channel": q.per_channel, "ch_axis": q.ch_axis}


def _quantizer_from_spec(spec: dict[str, Any]) -> Quantizer:
    spec = dict(spec)
    name, bits = spec.pop("name"), spec.pop("bits")
    q = make_quantizer(name, bits, **spec)
    return q


def _materialise(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give every parameter/buffer the shape its saved tensor has (per-channel scales start as scalars), and
    create the parameters a run added."""
    for key, value in state.items():
        prefix, _, attr = key.rpartition(".")
        try:
            owner = module.get_submodule(prefix) if prefix else module
        except AttributeError:
            continue
        if attr in owner._parameters:
            # A bias the run created (init "ptq" folds a bias correction into a layer without one) is None here.
            if owner._parameters[attr] is None or owner._parameters[attr].shape != value.shape:
                owner._parameters[attr] = nn.Parameter(torch.empty_like(value))
        elif attr in owner._buffers and owner._buffers[attr] is not None:
            if owner._buffers[attr].shape != value.shape:
                owner._buffers[attr] = torch.empty_like(value)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": json.dumps(random.getstate()),
        "numpy": json.dumps([np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = json.loads(state["numpy"])
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
