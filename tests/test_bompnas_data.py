"""BOMP-NAS on image files: trials see the inputs the family's pretrained base was trained on."""

from __future__ import annotations

import numpy as np
import torch

import search.solvers.bompnas as bompnas
from search.solvers.bompnas import BompNasConfig, train_candidate
from zoo.models import get_model_spec

TINY_ARCH = {"width1": 0.25, "width2": 0.25, "width3": 0.25, "depth1": 1, "depth2": 1, "depth3": 1}


def _images(path, n, seed):
    rng = np.random.default_rng(seed)
    np.savez(path, x=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), y=rng.integers(0, 10, n))
    return str(path)


def test_image_files_are_normalised_as_the_base_model_expects(tmp_path, monkeypatch):
    train = _images(tmp_path / "train.npz", 48, 0)
    sel = _images(tmp_path / "sel.npz", 24, 1)
    cfg = BompNasConfig(family="zoo:cifar-resnet20", init="scratch", data=train, selection_data=sel,
                        train_steps=1, qaft_steps=1, batch_size=16, weight_bits=[8])
    seen = []
    original = bompnas._datasets

    def spy(*args):
        out = original(*args)
        seen.append(out)
        return out

    monkeypatch.setattr(bompnas, "_datasets", spy)
    out = train_candidate(cfg, TINY_ARCH, None, suggest=lambda names: {n: 8 for n in names})
    assert out.measured and out.score is not None
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in get_model_spec("cifar-resnet20").normalisation)
    raw = torch.from_numpy(np.load(train)["x"]).permute(0, 3, 1, 2).float() / 255
    tr, selection = seen[0]
    torch.testing.assert_close(tr.x, (raw - mean) / std)  # not the [0, 1] pixels the base never saw
    raw_sel = torch.from_numpy(np.load(sel)["x"]).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(selection.x, (raw_sel - mean) / std)
