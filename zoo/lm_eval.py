"""Evaluation of causal language models on token data: perplexity and per-token KL to the FP model.

Every figure is over the target tokens of the data (`y != IGNORE`, i.e. not padding), per token:

    loss        = mean over target tokens of −log q(y_t | y_<t)              (nats per token)
    perplexity  = exp(loss)
    kl          = mean over target tokens of KL(p_ref(·|y_<t) ‖ q(·|y_<t))   (reference: the FP model's logits)
    agreement   = % of target positions whose most likely next token matches the reference's
    token_accuracy = % of target positions where the most likely next token is the actual one

`top1` stays None: the search ranks a language model's candidates by KL to the FP model (or loss), not by
next-token accuracy. `per_sample_loss` (one mean NLL per sequence) gives confidence intervals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quant.errors import BitsearchError

from .data import ArrayDataset
from .evaluate import EvalResult, batched_logits
from .tokens import IGNORE, is_token_data

DEFAULT_BATCH_SIZE = 16


@dataclass
class TokenEvalResult(EvalResult):
    perplexity: float | None = None
    token_accuracy: float | None = None
    tokens: int = 0  # target tokens scored
    per_sample_loss: torch.Tensor | None = field(default=None, repr=False, compare=False)  # (N,) mean NLL

    def to_dict(self) -> dict[str, Any]:
        return {
            **super().to_dict(), "perplexity": self.perplexity, "token_accuracy": self.token_accuracy,
            "tokens": self.tokens,
        }


def predict_tokens(model: nn.Module, data: ArrayDataset | torch.Tensor, batch_size: int = DEFAULT_BATCH_SIZE):
    """Next-token logits (float32, N × vocab × (T-1)) of `model` on every sequence, in eval mode, no autograd."""
    x = data.x if isinstance(data, ArrayDataset) else data
    if not is_token_data(x):
        raise BitsearchError(f"expected N×T integer token ids, got {tuple(x.shape)} {x.dtype}")
    t = int(x.shape[1])

    def check(logits: torch.Tensor, b: int) -> None:
        if logits.dim() != 3 or logits.shape[0] != b or logits.shape[2] != t - 1:
            raise BitsearchError(
                f"the model returned logits of shape {tuple(logits.shape)} for {b} sequences of {t} "
                f"tokens; expected (batch, vocab, {t - 1}) next-token logits"
            )

    return batched_logits(model, x, batch_size, check)


def evaluate_tokens(
    model: nn.Module,
    data: ArrayDataset,
    reference_logits: torch.Tensor | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> TokenEvalResult:
    """Perplexity and loss on `data`'s target tokens; KL and agreement to `reference_logits` when given."""
    if data.y is None:
        raise BitsearchError(f"{data.name} has no next-token targets; build token data with zoo.tokens.token_dataset")
    logits = predict_tokens(model, data, batch_size)
    y = data.y
    vocab = logits.shape[1]
    hi = int(y.max())
    if hi >= vocab:
        raise BitsearchError(f"{data.name} has token ids up to {hi} but the model's vocabulary has {vocab}")
    valid = y != IGNORE
    count = int(valid.sum())
    if count == 0:
        raise BitsearchError(f"{data.name} has no target token to score")
    nll = F.cross_entropy(logits, y, reduction="none", ignore_index=IGNORE).double()  # (N, T-1), 0 at IGNORE
    per_row = valid.sum(1).clamp(min=1)
    loss = float(nll.sum() / count)
    pred = logits.argmax(1)
    res = TokenEvalResult(
        n=int(len(logits)), logits=logits, loss=loss, perplexity=math.exp(loss),
        token_accuracy=float((pred == y)[valid].double().mean()) * 100.0, tokens=count,
        per_sample_loss=nll.sum(1) / per_row,
    )
    # Per-sequence values behind the means, for paired comparisons of two models on the same sequences
    # (search.selection): "ce" = mean NLL of the sequence's target tokens; "kl"/"agree" below.
    res.per_sample["ce"] = (nll.sum(1) / per_row).double()
    if reference_logits is not None:
        ref = reference_logits.detach().to(torch.float32)
        if ref.shape != logits.shape:
            raise BitsearchError(
                f"reference logits have shape {tuple(ref.shape)} but the model's are {tuple(logits.shape)}"
            )
        log_p = F.log_softmax(ref.double(), dim=1)
        log_q = F.log_softmax(logits.double(), dim=1)
        kl = (log_p.exp() * (log_p - log_q)).sum(1)  # (N, T-1)
        res.kl = max(float(kl[valid].mean()), 0.0)
        res.agreement = float((pred == ref.argmax(1))[valid].double().mean()) * 100.0
        res.per_sample["kl"] = (kl * valid).sum(1).clamp(min=0.0) / per_row
        res.per_sample["agree"] = ((pred == ref.argmax(1)) & valid).sum(1).double() / per_row
    return res
