"""QBitOpt moves bits when, and only when, the sensitivities it estimates from training change.

The callback is driven step by step with real backward passes on a two-layer model whose loss first leans on
one layer and then on the other, so its running Fisher (what `on_step` reads from `.grad`) genuinely changes.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from quant import Allocation, LayerBits
from quant.apply import apply_allocation, quantized_layers
from quant.cost import CostModel
from quant.layers import discover_layers
from quant.qat.state import StepState
from search import AllocationProblem
from search.solvers.qbitopt import QBitOptCallback


class TwoBranches(nn.Module):
    """Two equal linear layers side by side: the average-bits budget can give 4 bits to one of them only."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16, bias=False)
        self.b = nn.Linear(16, 16, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


OPTIONS = [LayerBits(2), LayerBits(4)]


def _setup(every_k: int = 5, **kwargs):
    torch.manual_seed(0)
    model = TwoBranches()
    x = torch.randn(32, 16)
    layers = discover_layers(model, x[:2])
    cost = CostModel(layers)
    start = Allocation({"a": LayerBits(2), "b": LayerBits(4)})
    qmodel = apply_allocation(model, start)

    def factory(table):
        return AllocationProblem(table, cost, ["avg_wbits=3"])

    cb = QBitOptCallback(factory, every_k, layers, OPTIONS, solver="exhaustive", ema=0.5, freeze_at=1.0,
                         **kwargs)
    return cb, qmodel, x, start


def _drive(cb, qmodel, x, allocation, weights, steps, first_step, total):
    """`steps` optimizer-free steps of loss = wa·mean(a(x)²) + wb·mean(b(x)²); returns the allocation the
    callback leaves (a trainer would apply each returned allocation, as `set_allocation` does)."""
    layers = quantized_layers(qmodel)
    wa, wb = weights
    for i in range(steps):
        step = first_step + i
        qmodel.zero_grad(set_to_none=True)
        xb = x[(step * 8) % 32:(step * 8) % 32 + 8]
        loss = wa * layers["a"](xb).pow(2).mean() + wb * layers["b"](xb).pow(2).mean()
        loss.backward()
        state = StepState(step=step, total_steps=total, epoch=0, loss=float(loss.detach()), lr=0.0, seconds=0.0,
                          allocation=allocation, model=qmodel, trainer=SimpleNamespace(batch_size=8))
        new = cb.on_step(state)
        if new is not None:
            allocation = new
    return allocation


def test_bits_follow_the_layer_the_loss_depends_on():
    cb, qmodel, x, alloc = _setup()
    # phase 1: the loss leans on layer a (100x): a is worth the 4 bits, though the start gave them to b
    alloc = _drive(cb, qmodel, x, alloc, (100.0, 1.0), 20, 1, 100)
    assert (alloc["a"].weight_bits, alloc["b"].weight_bits) == (4, 2)
    assert cb.changes == 1
    first = cb.history[0]
    assert first["step"] == 5 and first["changed"] == ["a", "b"]
    assert first["optimum"] < first["objective_before"] and first["optimum_differs"]
    # later re-solves on unchanged sensitivities keep the allocation, and say the optimum is the current one
    assert all(not h["changed"] and not h["optimum_differs"] for h in cb.history[1:])
    # phase 2: the loss now leans on b; the running Fisher forgets phase 1 and the bits move back
    alloc = _drive(cb, qmodel, x, alloc, (1.0, 100.0), 20, 21, 100)
    assert (alloc["a"].weight_bits, alloc["b"].weight_bits) == (2, 4)
    assert cb.changes == 2 and cb.updates == 8
    moved = [h for h in cb.history if h["changed"]]
    assert [h["step"] for h in moved][0] == 5 and 25 <= moved[1]["step"] <= 30


def test_min_gain_and_freeze_hold_the_allocation():
    cb, qmodel, x, alloc = _setup(min_gain=0.99)
    out = _drive(cb, qmodel, x, alloc, (2.0, 1.0), 20, 1, 100)
    assert out == alloc and cb.changes == 0
    assert all(h["optimum_differs"] for h in cb.history)  # a better optimum existed, but not 99 % better
    cb, qmodel, x, alloc = _setup()
    cb.freeze_at = 0.1  # 10 of 100 steps: updates at 5 and 10 only
    _drive(cb, qmodel, x, alloc, (1.0, 100.0), 30, 1, 100)
    assert [h["step"] for h in cb.history] == [5, 10]


@pytest.mark.parametrize("every_k", [2, 7])
def test_updates_come_every_k_steps_after_warmup(every_k):
    cb, qmodel, x, alloc = _setup(every_k=every_k)
    _drive(cb, qmodel, x, alloc, (1.0, 1.0), 21, 1, 100)
    assert [h["step"] for h in cb.history] == list(range(every_k, 22, every_k))
    assert cb.calls == 21
