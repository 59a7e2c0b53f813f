"""Quantization-aware training: learnable quantizers (LSQ, PACT, DoReFa), Bin Regularization, the recipe
and the trainer that fine-tunes an `Allocation` (see `quant.qat.trainer` for the callback and checkpoint
interfaces; `state`, `checkpoint` and `layers` hold their parts).

    from quant.qat import QATRecipe, finetune
    result = finetune(model, allocation, train_data, QATRecipe(steps=300), eval_data=test)

Importing this package registers the "lsq", "pact" and "dorefa" quantizers in `quant.QUANTIZERS`.
"""

from .binreg import bin_regularization, binreg_loss
from .quantizers import (
    DoReFaQuantizer,
    LearnableQuantizer,
    LSQQuantizer,
    PACTQuantizer,
    grad_scale,
    pact_l2_penalty,
)
from .recipe import QATRecipe
from .checkpoint import CHECKPOINT_NAME
from .state import Callback, PrintProgress, QATResult, StepState
from .trainer import QATTrainer, finetune, strip_quantizers

__all__ = [
    "CHECKPOINT_NAME",
    "Callback",
    "DoReFaQuantizer",
    "LSQQuantizer",
    "LearnableQuantizer",
    "PACTQuantizer",
    "PrintProgress",
    "QATRecipe",
    "QATResult",
    "QATTrainer",
    "StepState",
    "bin_regularization",
    "binreg_loss",
    "finetune",
    "grad_scale",
    "pact_l2_penalty",
    "strip_quantizers",
]
