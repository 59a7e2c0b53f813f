"""`QATRecipe`: everything that decides a QAT run, as one JSON-serialisable dataclass.

    recipe = QATRecipe(steps=300, lr=0.01, distill=True)
    QATRecipe.from_dict(json.loads(text))   # unknown fields or bad values raise BitsearchError

Fields (defaults in brackets):
- quantizers: `weight_quantizer` ["lsq"] | "dorefa" | "int_sym" (static calibrated scale, straight-through);
  `activation_quantizer` ["lsq"] | "pact" | "static" (the calibrated uint/int_asym quantizer, fixed);
  `weight_granularity` ["per_channel"] | "per_tensor"; `init` ["calibrated"]: learned steps/clips start
  from the calibrated ranges (`weight_clip` ["mse"], `activation_clip` ["mse"] on `calibration_samples`
  [256] inputs), or "paper": LSQ's s = 2⟨|v|⟩/√Q_P (and PACT's α = `pact_alpha`, 6 when unset), or "ptq":
  start from the search's PTQ realisation (`quant.apply.search_quant_config`, or the trainer's
  `quant_config`): latent weights = the PTQ (GPTQ-rounded, dequantized) weights, LSQ steps = its per-channel
  scales, activation ranges = its calibrated ranges, its bias correction folded into a trainable bias; the
  clip fields do not apply then (the PTQ recipe sets them);
  `pact_alpha` [None: from calibration], `pact_l2` [0: L2 on α, added to the loss].
- optimisation: `optimizer` ["sgd"] | "adamw"; `lr` [0.01]; `quantizer_lr` [None: = lr] for steps/clips;
  `weight_decay` [1e-4] on conv/linear weights only (never on biases, BatchNorm or quantizer parameters);
  `momentum` [0.9] (SGD momentum, AdamW β1); `schedule` ["cosine"] | "constant", with `warmup_steps` [0] of
  linear warm-up; `steps` [1000] or `epochs` (one of the two; epochs are over the training data at
  `batch_size` [128], incomplete last batch dropped); `grad_clip` [None: max global grad norm]; `seed` [0].
- distillation from the FP32 model: `distill` [False], `distill_temperature` [4.0], `distill_alpha` [0.5]:
  loss = (1-α)·CE + α·T²·KL(softmax(teacher/T) ‖ softmax(student/T)).
- BatchNorm: `bn` ["train"] (batch statistics, running stats updated) | "frozen" (eval-mode BN: running
  statistics fixed, γ/β still learn) | "reestimate" (train as "train", then, before every evaluation and at
  the end, recompute the running statistics of the quantized model on `bn_batches` [20] fixed training
  batches).
- Bin Regularization: `binreg_lambda` [0: off], `binreg_start` [0: the step it starts at].
- bookkeeping: `checkpoint_every` [0: only on stop and at the end, when a checkpoint_dir is given];
  `eval_every` [0: at the end only]; `device` ["auto": CUDA with bf16 autocast when available, else CPU
  fp32] | "cpu" | "cuda".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from ..calibration import CLIP_METHODS
from ..errors import BitsearchError

WEIGHT_QUANTIZERS = ("lsq", "dorefa", "int_sym")
ACTIVATION_QUANTIZERS = ("lsq", "pact", "static")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")
BN_MODES = ("train", "frozen", "reestimate")
DEVICES = ("auto", "cpu", "cuda")
INITS = ("calibrated", "paper", "ptq")
WEIGHT_ONLY_CLIPS = ("output_mse", "auto")

#: Fields that may differ between a checkpoint's recipe and the recipe of the run that resumes it.
RESUMABLE_CHANGES = ("checkpoint_every", "eval_every", "device")


@dataclass
class QATRecipe:
    weight_quantizer: str = "lsq"
    activation_quantizer: str = "lsq"
    weight_granularity: str = "per_channel"
    init: str = "calibrated"
    weight_clip: str = "mse"
    activation_clip: str = "mse"
    calibration_samples: int = 256
    pact_alpha: float | None = None
    pact_l2: float = 0.0
    optimizer: str = "sgd"
    lr: float = 0.01
    quantizer_lr: float | None = None
    weight_decay: float = 1e-4
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_steps: int = 0
    steps: int | None = 1000
    epochs: float | None = None
    batch_size: int = 128
    grad_clip: float | None = None
    seed: int = 0
    distill: bool = False
    distill_temperature: float = 4.0
    distill_alpha: float = 0.5
    bn: str = "train"
    bn_batches: int = 20
    binreg_lambda: float = 0.0
    binreg_start: int = 0
    checkpoint_every: int = 0
    eval_every: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        _choice("weight_quantizer", self.weight_quantizer, WEIGHT_QUANTIZERS)
        _choice("activation_quantizer", self.activation_quantizer, ACTIVATION_QUANTIZERS)
        _choice("weight_granularity", self.weight_granularity, ("per_channel", "per_tensor"))
        _choice("init", self.init, INITS)
        _choice("weight_clip", self.weight_clip, tuple(sorted(CLIP_METHODS)))
        _choice("activation_clip", self.activation_clip, tuple(m for m in sorted(CLIP_METHODS) if m not in WEIGHT_ONLY_CLIPS))
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("bn", self.bn, BN_MODES)
        _choice("device", self.device, DEVICES)
        _int("calibration_samples", self.calibration_samples, 1)
        _int("warmup_steps", self.warmup_steps, 0)
        _int("batch_size", self.batch_size, 1)
        _int("seed", self.seed, 0)
        _int("bn_batches", self.bn_batches, 1)
        _int("binreg_start", self.binreg_start, 0)
        _int("checkpoint_every", self.checkpoint_every, 0)
        _int("eval_every", self.eval_every, 0)
        _bool("distill", self.distill)
        _num("lr", self.lr, 0.0, strict_low=True)
        if self.quantizer_lr is not None:
            _num("quantizer_lr", self.quantizer_lr, 0.0)
        _num("weight_decay", self.weight_decay, 0.0)
        _num("momentum", self.momentum, 0.0, 1.0, strict_high=True)
        _num("pact_l2", self.pact_l2, 0.0)
        if self.pact_alpha is not None:
            _num("pact_alpha", self.pact_alpha, 0.0, strict_low=True)
        if self.grad_clip is not None:
            _num("grad_clip", self.grad_clip, 0.0, strict_low=True)
        _num("distill_temperature", self.distill_temperature, 0.0, strict_low=True)
        _num("distill_alpha", self.distill_alpha, 0.0, 1.0)
        _num("binreg_lambda", self.binreg_lambda, 0.0)
        if (self.steps is None) == (self.epochs is None):
            raise BitsearchError("give exactly one of steps and epochs (set the other to null)")
        if self.steps is not None:
            _int("steps", self.steps, 1)
        if self.epochs is not None:
            _num("epochs", self.epochs, 0.0, strict_low=True)

    def total_steps(self, n_train: int) -> int:
        """The number of optimizer steps for a training set of `n_train` items."""
        if self.steps is not None:
            return self.steps
        per_epoch = max(1, n_train // self.batch_size)
        return max(1, math.ceil(self.epochs * per_epoch))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QATRecipe":
        if not isinstance(d, Mapping):
            raise BitsearchError(f"a QAT recipe must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise BitsearchError(f"unknown QAT recipe field(s) {unknown}; known: {sorted(known)}")
        data = dict(d)
        # A recipe that names epochs and omits steps means epochs (steps' default would make it ambiguous).
        if data.get("epochs") is not None and "steps" not in data:
            data["steps"] = None
        return cls(**data)

    def differences(self, other: "QATRecipe") -> list[str]:
        a, b = self.to_dict(), other.to_dict()
        return [k for k in a if a[k] != b[k]]


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise BitsearchError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise BitsearchError(f"{name} must be an integer ≥ {low}, got {value!r}")


def _bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise BitsearchError(f"{name} must be true or false, got {value!r}")


def _num(
    name: str, value: Any, low: float, high: float | None = None, strict_low: bool = False, strict_high: bool = False
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BitsearchError(f"{name} must be a finite number, got {value!r}")
    if value < low or (strict_low and value == low):
        raise BitsearchError(f"{name} must be {'>' if strict_low else '≥'} {low}, got {value!r}")
    if high is not None and (value > high or (strict_high and value == high)):
        raise BitsearchError(f"{name} must be {'<' if strict_high else '≤'} {high}, got {value!r}")
