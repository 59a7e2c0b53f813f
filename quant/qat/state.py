"""What the QAT trainer reports: the state a callback sees after each step, the callback protocol, the result,
and a printing callback (see `quant.qat.trainer` for how they are used)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

from torch import nn

from ..allocation import Allocation
from .recipe import QATRecipe

if TYPE_CHECKING:
    from .trainer import QATTrainer


@dataclass
class StepState:
    """What a callback sees after each optimizer step."""

    step: int
    total_steps: int
    epoch: int
    loss: float
    lr: float
    seconds: float
    allocation: Allocation
    model: nn.Module
    trainer: "QATTrainer"
    metrics: dict[str, Any] | None = None
    stop_requested: bool = False

    @property
    def progress(self) -> float:
        return self.step / max(1, self.total_steps)

    def request_stop(self) -> None:
        self.stop_requested = True


@runtime_checkable
class Callback(Protocol):
    def on_step(self, state: StepState) -> Allocation | None: ...


@dataclass
class QATResult:
    metrics: dict[str, Any]  # final evaluation on eval_data ({} without eval data)
    steps: int  # optimizer steps done in total (across resumes)
    seconds: float  # wall time of training and evaluation, summed across resumes
    history: list[dict[str, Any]]
    allocation: Allocation  # the final allocation (a callback may have changed bits)
    checkpoint: Path | None
    model: nn.Module  # the trained fake-quant model, eval mode
    recipe: QATRecipe
    stopped: bool = False  # True when a stop request ended training early
    initial_metrics: dict[str, Any] | None = None  # before training (the PTQ starting point), fresh runs
    train_seconds: float = 0.0  # time in optimizer steps only
    device: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        return {
            "metrics": self.metrics,
            "initial_metrics": self.initial_metrics,
            "steps": self.steps,
            "seconds": self.seconds,
            "train_seconds": self.train_seconds,
            "stopped": self.stopped,
            "allocation": self.allocation.to_dict(),
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "recipe": self.recipe.to_dict(),
            "device": self.device,
        }


class PrintProgress:
    """A callback that prints step, loss and lr every `every` steps (and every evaluation)."""

    def __init__(self, every: int = 50, prefix: str = "", printer: Callable[[str], None] = print):
        self.every, self.prefix, self.printer = every, prefix, printer

    def on_step(self, state: StepState) -> None:
        if state.metrics is not None or state.step % self.every == 0 or state.step == state.total_steps:
            extra = f" top1 {state.metrics['top1']:.2f} %" if state.metrics and state.metrics.get("top1") is not None else ""
            self.printer(
                f"{self.prefix}step {state.step}/{state.total_steps} loss {state.loss:.4f} lr {state.lr:.2e} "
                f"({state.seconds:.0f} s){extra}"
            )
