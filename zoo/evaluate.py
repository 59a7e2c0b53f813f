"""Accuracy and fidelity of a (quantized) model on an in-memory data set.

The search evaluates the same model on the same images many times, so this is kept to one batched forward
pass under `inference_mode`, written into a preallocated logits tensor, and every metric is derived from
those logits. Fidelity to the FP32 model (top-1 agreement and KL divergence against its logits) needs no
labels, which is what makes label-free data usable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from quant.errors import BitsearchError

from .data import ArrayDataset

#: Small enough for a CIFAR ResNet's activations to stay in cache: on 2 CPU cores ResNet-20 on 10,000 images
#: took ~4 s at 64, ~5.5 s at 128 and 7-20 s at 500+.
DEFAULT_BATCH_SIZE = 64


def _logits_of(output: Any) -> torch.Tensor:
    if torch.is_tensor(output):
        return output
    logits = getattr(output, "logits", None)  # e.g. Hugging Face model outputs
    if torch.is_tensor(logits):
        return logits
    if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        return output[0]
    raise BitsearchError(f"the model returned a {type(output).__name__}; expected a tensor of logits")


def predict(
    model: nn.Module, data: ArrayDataset | torch.Tensor, batch_size: int = DEFAULT_BATCH_SIZE
) -> torch.Tensor:
    """Logits (float32, N×K) of `model` on every item of `data`, in order.

    The model runs in eval mode (its previous mode is restored afterwards) without autograd.
    """

    def check(logits: torch.Tensor, b: int) -> None:
        if logits.dim() != 2 or logits.shape[0] != b:
            raise BitsearchError(
                f"the model returned logits of shape {tuple(logits.shape)} for a batch of {b}; "
                "expected (batch, classes)"
            )

    return batched_logits(model, data.x if isinstance(data, ArrayDataset) else data, batch_size, check)


def batched_logits(
    model: nn.Module, x: torch.Tensor, batch_size: int, check: Callable[[torch.Tensor, int], None]
) -> torch.Tensor:
    """`model`'s float32 outputs on `x`, batch by batch, in eval mode without autograd, into one preallocated
    tensor; `check(logits, batch)` refuses an output of the wrong shape (classifiers and language models
    expect different ones)."""
    if batch_size < 1:
        raise BitsearchError(f"batch size must be at least 1, got {batch_size}")
    n = int(x.shape[0])
    if n == 0:
        raise BitsearchError("cannot evaluate on an empty data set")
    was_training = model.training
    model.eval()
    out: torch.Tensor | None = None
    try:
        with torch.inference_mode():
            for i in range(0, n, batch_size):
                logits = _logits_of(model(x[i : i + batch_size]))
                check(logits, min(batch_size, n - i))
                if out is None:
                    out = torch.empty((n, *logits.shape[1:]), dtype=torch.float32)
                out[i : i + len(logits)] = logits
    finally:
        model.train(was_training)
    assert out is not None
    return out


@dataclass
class EvalResult:
    """Metrics over `n` items; a metric is None when its inputs (labels, reference) were not given."""

    n: int
    top1: float | None = None  # percent correct
    agreement: float | None = None  # percent of items whose top-1 class matches the reference's
    kl: float | None = None  # mean KL(reference || model) of the softmax outputs, in nats
    loss: float | None = None  # mean cross-entropy against the labels
    logits: torch.Tensor | None = field(default=None, repr=False, compare=False)  # for reuse as a reference
    #: Per-item values behind the means, for paired comparisons of two models on the same items (float64,
    #: shape (n,)): "correct" (1/0 against the labels), "ce" (cross-entropy), "agree" (1/0: same top-1 as
    #: the reference) and "kl" (KL(reference || model)); a key is absent when its inputs were not given.
    per_sample: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict[str, float | int | None]:
        return {"n": self.n, "top1": self.top1, "agreement": self.agreement, "kl": self.kl, "loss": self.loss}


def evaluate(
    model: nn.Module,
    data: ArrayDataset,
    reference_logits: torch.Tensor | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> EvalResult:
    """Top-1 and loss (when `data` has labels) and fidelity to `reference_logits` (when given).

    Pass `result.logits` of the FP32 model as `reference_logits` when evaluating its quantized versions.
    Token data (integer ids, see `zoo.tokens`) go to `zoo.lm_eval.evaluate_tokens` (perplexity, per-token KL).
    """
    from .tokens import is_token_data

    if is_token_data(data):
        from .lm_eval import evaluate_tokens

        return evaluate_tokens(model, data, reference_logits)
    logits = predict(model, data, batch_size)
    result = EvalResult(n=len(logits), logits=logits)
    if data.y is not None:
        y = data.y
        if int(y.max()) >= logits.shape[1]:
            raise BitsearchError(
                f"{data.name} has labels up to {int(y.max())} but the model outputs {logits.shape[1]} classes"
            )
        correct = (logits.argmax(1) == y).double()
        ce = F.cross_entropy(logits, y, reduction="none").double()
        result.per_sample.update(correct=correct, ce=ce)
        result.top1 = correct.mean().item() * 100.0
        result.loss = ce.mean().item()
    if reference_logits is not None:
        ref = reference_logits.detach().to(torch.float32)
        if ref.shape != logits.shape:
            raise BitsearchError(
                f"reference logits have shape {tuple(ref.shape)} but the model's are {tuple(logits.shape)}"
            )
        agree = (logits.argmax(1) == ref.argmax(1)).double()
        log_p_ref = F.log_softmax(ref, dim=1)
        log_q = F.log_softmax(logits, dim=1)
        # rounding can leave a tiny negative number for identical outputs
        kl = (log_p_ref.exp() * (log_p_ref - log_q)).sum(1).double().clamp(min=0.0)
        result.per_sample.update(agree=agree, kl=kl)
        result.agreement = agree.mean().item() * 100.0
        result.kl = kl.mean().item()
    return result
