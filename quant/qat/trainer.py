"""Quantization-aware fine-tuning of an allocation: `finetune(...)` or the `QATTrainer` behind it.

    result = finetune(model, allocation, train_data, QATRecipe(steps=300), eval_data=test,
                      checkpoint_dir="ckpt/")
    result.metrics["top1"], result.model, result.allocation

What it does
------------
1. Builds the fake-quant model: `apply_allocation` with the static quantizers (per-channel `int_sym`
   weights, uint/int_asym activations) calibrates every layer on `calibration` (default: a seeded subset of
   `train_data`), then each layer's quantizers are swapped for the recipe's learnable ones, initialised from
   those calibrated ranges (`init="calibrated"`) or as the papers do (`init="paper"`). With `init="ptq"` the
   model is first built with the search's PTQ recipe (`quant.apply.search_quant_config`, or `quant_config`):
   GPTQ-rounded weights become the latent weights, their per-channel scales LSQ's steps, the calibrated
   activation ranges LSQ's ranges, and a bias correction is folded into the layer's (trainable) bias, so
   step 0 is the model the search measured. Inputs that can be
   negative (the calibrated quantizer is int_asym, e.g. a normalised image) get LSQ with a learned offset
   (LSQ+), also under `activation_quantizer="pact"`. Float, ternary and binary layers keep their
   quantizers. `model` itself is never modified.
2. Trains for `recipe.total_steps(len(train_data))` steps: task loss (cross-entropy, or mixed with KD from
   the FP32 `model`), plus λ·Bin Regularization from `binreg_start`, plus `pact_l2`·Σα². The data order is
   a seeded permutation per epoch, so the position in the data follows from the step alone.
3. Evaluates on `eval_data` every `eval_every` steps and at the end; checkpoints (see below).

Callbacks and the bit-width hook
--------------------------------
`callbacks` is one object or a list. Each is either an object with `on_step(state)` (and optionally
`on_end(result)`) or a plain callable `f(state)`. It is called after every optimizer step (and after that
step's evaluation, if any) with a `StepState`: `step` (steps done), `total_steps`, `epoch`, `loss`, `lr`,
`metrics` (this step's evaluation or None), `seconds`, `allocation`, `model` and `trainer`. The `.grad`
of every parameter still holds this step's gradient (after `grad_clip`) when `on_step` runs. A callback

- stops training by calling `state.request_stop()` (or, from another thread, `trainer.request_stop()`): the
  loop ends cleanly after this step, a checkpoint is written (when there is a checkpoint_dir), the model is
  evaluated and `result.stopped` is True;
- reports progress from `state.step / state.total_steps` (`state.progress`), `state.loss`, `state.lr`;
- changes bit-widths by returning a new `Allocation` from `on_step`, or by calling
  `state.trainer.set_allocation(allocation)` (also usable between construction and `run()`). Only layers
  whose `LayerBits` changed are touched: an integer→integer change keeps each quantizer and its clipping
  range (LSQ's step scales by Q_P(old)/Q_P(new), PACT's α stays, a static scale scales likewise) and
  drops the optimizer state of the re-scaled parameters; a layer that goes from float to integer is
  initialised as at the start (activations from one calibration pass over the calibration inputs); a layer
  that goes to float gets a float quantizer. The optimizer's parameter groups follow the model. The new
  allocation is in `result.allocation` and in every later checkpoint.

Checkpoints and resume
----------------------
With `checkpoint_dir`, `<dir>/qat-checkpoint.pt` is written every `checkpoint_every` steps, on a stop
request and at the end, atomically (a temporary file in the same folder, then `os.replace`). It holds only
tensors and primitive containers (`torch.load(..., weights_only=True)` reads it): the model state (weights,
BatchNorm buffers, quantizer parameters), the quantizer layout of every layer (JSON), the optimizer and
scheduler states, the step, the current allocation and the recipe (JSON), the RNG states (torch CPU and
CUDA, Python `random`, NumPy; the caller's RNG is restored when `run()` returns), the data position, the
history and the elapsed time. `resume_from` (that file or its folder) rebuilds the model from the
checkpoint alone (no calibration pass) and continues; on CPU an interrupted-then-resumed run ends with
weights identical to an uninterrupted one. The resumed recipe must equal the checkpoint's, except
`checkpoint_every`, `eval_every` and `device`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import random
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..allocation import Allocation, LayerBits
from ..apply import (
    QuantConfig,
    QuantizedLayer,
    apply_allocation,
    quantized_layers,
    search_quant_config,
    wrap_model,
)
from ..errors import BitsearchError
from ..quantizers import Quantizer
from .binreg import binreg_loss
from .checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    _materialise,
    _quantizer_from_spec,
    _quantizer_spec,
    _rng_state,
    _set_rng_state,
    read_checkpoint,
    write_checkpoint,
)
from .layers import LayerQuantizers
from .quantizers import pact_l2_penalty
from .recipe import QATRecipe
from .state import QATResult, StepState



def strip_quantizers(model: nn.Module) -> nn.Module:
    """A copy of a fake-quant model with every `QuantizedLayer` replaced by its plain layer.

    The trained weights are kept in float (not rounded onto the grid): use it to continue from a fine-tuned
    FP32 run (an all-float allocation) or to re-quantize from scratch; `model` itself is untouched.
    """
    plain = copy.deepcopy(model)
    for parent in list(plain.modules()):
        for name, child in list(parent._modules.items()):
            if isinstance(child, QuantizedLayer):
                setattr(parent, name, child.layer)
    return plain


def finetune(
    model: nn.Module,
    allocation: Allocation,
    train_data: Any,
    recipe: QATRecipe | None = None,
    callbacks: Any = None,
    calibration: Any = None,
    eval_data: Any = None,
    checkpoint_dir: str | Path | None = None,
    resume_from: str | Path | None = None,
    quant_config: QuantConfig | None = None,
) -> QATResult:
    """Quantization-aware fine-tuning of `model` at `allocation`; see the module docstring.

    `train_data` / `eval_data`: an `ArrayDataset` with labels (or an `(x, y)` pair of tensors);
    `calibration`: what `apply_allocation` takes (default: `recipe.calibration_samples` seeded items of the
    training data). With `resume_from`, the model layout, the (possibly changed) allocation and all training
    state come from the checkpoint; `model` is still needed (architecture, KD teacher). `quant_config`: with
    `recipe.init == "ptq"`, the PTQ recipe to start from (default: the search's, `search_quant_config`).
    """
    return QATTrainer(
        model, allocation, train_data, recipe, callbacks, calibration, eval_data, checkpoint_dir, resume_from,
        quant_config,
    ).run()


# --------------------------------------------------------------------------------------------------------------
# Helpers


def _as_xy(data: Any, what: str, need_labels: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    from zoo.data import as_dataset  # zoo needs only quant.errors: no cycle

    ds = as_dataset(data, what)
    x, y = ds.x, ds.y
    if need_labels and y is None:
        raise BitsearchError(f"{what} has no labels; QAT needs labelled data")
    if y is not None and len(y) != len(x):
        raise BitsearchError(f"{what}: {len(x)} inputs but {len(y)} labels")
    if len(x) == 0:
        raise BitsearchError(f"{what} is empty")
    return x, (None if y is None else y.long())


def _quant_config(recipe: QATRecipe, ptq: QuantConfig | None) -> QuantConfig:
    """The static quantizers the fake-quant model is built with before the learnable ones replace them."""
    if recipe.init != "ptq":
        if ptq is not None:
            raise BitsearchError('a quant_config is only used with init "ptq"')
        return QuantConfig(
            weight_quantizer="int_sym",
            weight_granularity=recipe.weight_granularity,
            weight_clip=recipe.weight_clip,
            activation_quantizer="auto",
            activation_clip=recipe.activation_clip,
            calibration_samples=recipe.calibration_samples,
        )
    if ptq is None:
        # The search's PTQ recipe (GPTQ, output-MSE/auto weight clipping, MSE activations, bias correction);
        # the recipe's own clip fields do not apply: the point is to start from what the search measured.
        return dataclasses.replace(
            search_quant_config(None, True),
            weight_granularity=recipe.weight_granularity,
            calibration_samples=recipe.calibration_samples,
        )
    if not isinstance(ptq, QuantConfig):
        raise BitsearchError(f"quant_config must be a QuantConfig, got {type(ptq).__name__}")
    # LSQ's signed grid is int_sym's (narrow, zero point 0) and rounds to nearest: other PTQ grids cannot be
    # carried over step for step.
    if ptq.weight_quantizer != "int_sym" or ptq.stochastic_rounding:
        raise BitsearchError(
            f'init "ptq" starts LSQ from int_sym weights rounded deterministically; the quant_config has '
            f"weight_quantizer {ptq.weight_quantizer!r}, stochastic_rounding {ptq.stochastic_rounding}"
        )
    if ptq.weight_granularity != recipe.weight_granularity:
        raise BitsearchError(
            f"the quant_config's weight_granularity {ptq.weight_granularity!r} differs from the recipe's "
            f"{recipe.weight_granularity!r}"
        )
    return ptq


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BitsearchError("recipe.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


def _cosine_factor(recipe: QATRecipe, total: int) -> Callable[[int], float]:
    warm = min(recipe.warmup_steps, total)

    def factor(k: int) -> float:  # lr multiplier for step k (0-based)
        if k < warm:
            return (k + 1) / warm
        if recipe.schedule == "constant":
            return 1.0
        span = max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(k - warm, span) / span))

    return factor


# --------------------------------------------------------------------------------------------------------------
# The trainer


class QATTrainer(LayerQuantizers):
    """Builds the fake-quant model in the constructor; `run()` trains it. See the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        allocation: Allocation,
        train_data: Any,
        recipe: QATRecipe | None = None,
        callbacks: Any = None,
        calibration: Any = None,
        eval_data: Any = None,
        checkpoint_dir: str | Path | None = None,
        resume_from: str | Path | None = None,
        quant_config: QuantConfig | None = None,
    ):
        self.recipe = recipe or QATRecipe()
        if not isinstance(self.recipe, QATRecipe):
            raise BitsearchError(f"recipe must be a QATRecipe, got {type(self.recipe).__name__}")
        self.teacher_source = model
        self.train_x, self.train_y = _as_xy(train_data, "train_data")
        self.eval_data = None if eval_data is None else _as_xy(eval_data, "eval_data")
        self.calibration = calibration
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        if callbacks is None:
            callbacks = []
        elif not isinstance(callbacks, (list, tuple)):
            callbacks = [callbacks]
        for cb in callbacks:
            if not (hasattr(cb, "on_step") or callable(cb)):
                raise BitsearchError(f"a callback must have on_step(state) or be callable, got {type(cb).__name__}")
        self.callbacks = list(callbacks)
        self.device = _resolve_device(self.recipe.device)
        # The fine-tuned model is handed back where the caller's model lives, whichever device trained it.
        self.home_device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.amp = self.device.type == "cuda"
        self.config = _quant_config(self.recipe, quant_config)
        n = len(self.train_x)
        self.total_steps = self.recipe.total_steps(n)
        self.batch_size = min(self.recipe.batch_size, n)
        self.steps_per_epoch = max(1, n // self.batch_size)
        self._perm_cache: tuple[int, torch.Tensor] | None = None
        self._fixed_order: torch.Tensor | None = None
        self._stop = threading.Event()
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.seconds_before = 0.0
        self.train_seconds_before = 0.0
        self.initial_metrics: dict[str, Any] | None = None
        self._rng_resume: dict[str, Any] | None = None
        self.checkpoint_path: Path | None = None

        if resume_from is not None:
            ck = self._load_checkpoint(Path(resume_from))
            self.allocation = Allocation.from_json(ck["allocation"])
            self.model = self._build_from_layout(json.loads(ck["layers"]), ck["model"])
        else:
            ck = None
            self.allocation = allocation
            self.model = self._build_fresh()
        self.model.to(self.device)
        self.teacher = None
        if self.recipe.distill:
            self.teacher = copy.deepcopy(model).to(self.device).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        self.optimizer = self._make_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _cosine_factor(self.recipe, self.total_steps)
        )
        if ck is not None:
            self.optimizer.load_state_dict(ck["optimizer"])
            self.scheduler.load_state_dict(ck["scheduler"])
            self.step = int(ck["step"])
            self.history = json.loads(ck["history"])
            self.seconds_before = float(ck["seconds"])
            self.train_seconds_before = float(ck["train_seconds"])
            self.initial_metrics = json.loads(ck["initial_metrics"])
            self._rng_resume = ck["rng"]
            data = ck["data"]
            if int(data["n"]) != n or int(data["batch_size"]) != self.batch_size:
                raise BitsearchError(
                    f"the checkpoint was trained on {int(data['n'])} items in batches of {int(data['batch_size'])}; "
                    f"this run has {n} in batches of {self.batch_size}: resume with the same training data"
                )

    # --- building ---------------------------------------------------------------------------------
    def _calibration_inputs(self) -> Any:
        if self.calibration is not None:
            return self.calibration
        n = len(self.train_x)
        k = min(n, self.recipe.calibration_samples)
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(self.recipe.seed + 104729))[:k]
        return self.train_x[torch.sort(idx).values]

    def _build_fresh(self) -> nn.Module:
        qmodel = apply_allocation(self.teacher_source, self.allocation, self._calibration_inputs(), self.config)
        for layer in quantized_layers(qmodel).values():
            static_w = self._adopt_ptq(layer) if self.recipe.init == "ptq" else layer.weight_quant
            self._install(layer, layer.bits, static_w=static_w, static_a=layer.input_quant)
        return qmodel

    def _build_from_layout(self, layout: dict[str, Any], state: dict[str, torch.Tensor]) -> nn.Module:
        qmodel = copy.deepcopy(self.teacher_source)
        layers = wrap_model(qmodel, self.config)
        if set(layers) != set(layout):
            raise BitsearchError("the checkpoint's layers do not match this model: resume with the same model")
        for name, layer in layers.items():
            entry = layout[name]
            layer.bits = LayerBits.from_dict(entry["bits"], where=f"layer {name!r}")
            layer.weight_quant = _quantizer_from_spec(entry["weight"])
            layer.input_quant = _quantizer_from_spec(entry["input"])
        _materialise(qmodel, state)
        try:
            qmodel.load_state_dict(state)
        except RuntimeError as exc:
            raise BitsearchError(f"the checkpoint does not fit this model: {exc}") from None
        for layer in layers.values():
            for q in (layer.weight_quant, layer.input_quant):
                q.calibrated = True
            layer._wq_cache = None
        return qmodel

    def _layout(self) -> dict[str, Any]:
        return {
            name: {
                "bits": layer.bits.to_dict(),
                "weight": _quantizer_spec(layer.weight_quant),
                "input": _quantizer_spec(layer.input_quant),
            }
            for name, layer in quantized_layers(self.model).items()
        }

    # --- optimizer --------------------------------------------------------------------------------
    def _param_lists(self) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
        quant_ids = {
            id(p) for m in self.model.modules() if isinstance(m, Quantizer) for p in m.parameters(recurse=False)
        }
        decay, no_decay, quant = [], [], []
        for _, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            if id(p) in quant_ids:
                quant.append(p)
            elif p.dim() > 1:
                decay.append(p)
            else:
                no_decay.append(p)
        return decay, no_decay, quant

    def _make_optimizer(self) -> torch.optim.Optimizer:
        r = self.recipe
        decay, no_decay, quant = self._param_lists()
        qlr = r.lr if r.quantizer_lr is None else r.quantizer_lr
        groups = [
            {"params": decay, "weight_decay": r.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
            {"params": quant, "weight_decay": 0.0, "lr": qlr},
        ]
        if r.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=r.lr, momentum=r.momentum)
        return torch.optim.AdamW(groups, lr=r.lr, betas=(r.momentum, 0.999))

    def _refresh_param_groups(self, reset: Iterable[nn.Parameter] = ()) -> None:
        lists = self._param_lists()
        for group, params in zip(self.optimizer.param_groups, lists):
            group["params"] = list(params)
        alive = {id(p) for params in lists for p in params}
        reset_ids = {id(p) for p in reset}
        for p in list(self.optimizer.state.keys()):
            if id(p) not in alive or id(p) in reset_ids:
                del self.optimizer.state[p]

    def request_stop(self) -> None:
        """Ask the training loop to stop after the current step (safe from another thread)."""
        self._stop.set()

    # --- data -------------------------------------------------------------------------------------
    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            g = torch.Generator().manual_seed(self.recipe.seed * 1_000_003 + epoch)
            self._perm_cache = (epoch, torch.randperm(len(self.train_x), generator=g))
        return self._perm_cache[1]

    def _batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, pos = divmod(step, self.steps_per_epoch)
        idx = self._epoch_order(epoch)[pos * self.batch_size : (pos + 1) * self.batch_size]
        return self._to_device(self.train_x[idx]), self._to_device(self.train_y[idx])

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t if t.device == self.device else t.to(self.device, non_blocking=True)

    def _autocast(self):
        if self.amp:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # --- modes, BN, evaluation ----------------------------------------------------------------------
    def _train_mode(self) -> None:
        self.model.train()
        if self.recipe.bn == "frozen":
            for m in self.model.modules():
                if _is_bn(m):
                    m.eval()

    @torch.no_grad()
    def _reestimate_bn(self) -> None:
        bns = [m for m in self.model.modules() if _is_bn(m) and m.track_running_stats]
        if not bns:
            return
        if self._fixed_order is None:
            g = torch.Generator().manual_seed(self.recipe.seed + 15485863)
            self._fixed_order = torch.randperm(len(self.train_x), generator=g)
        momenta = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the re-estimation batches
        self.model.train()
        n = len(self._fixed_order)
        try:
            for i in range(self.recipe.bn_batches):
                start = (i * self.batch_size) % n
                idx = self._fixed_order[start : start + self.batch_size]
                with self._autocast():
                    self.model(self._to_device(self.train_x[idx]))
        finally:
            for m, mom in zip(bns, momenta):
                m.momentum = mom
            self._train_mode()

    def evaluate(self, data: Any = None, batch_size: int = 256) -> dict[str, Any]:
        """Top-1 and cross-entropy of the current model on `data` (default: eval_data)."""
        if data is None and self.eval_data is None:
            raise BitsearchError("no evaluation data")
        x, y = _as_xy(data, "data", need_labels=True) if data is not None else self.eval_data
        for layer in quantized_layers(self.model).values():
            layer._wq_cache = None
        was_training = self.model.training
        self.model.eval()
        correct, loss_sum = 0, 0.0
        try:
            with torch.inference_mode(), self._autocast():
                for i in range(0, len(x), batch_size):
                    logits = self.model(self._to_device(x[i : i + batch_size])).float()
                    yb = self._to_device(y[i : i + batch_size])
                    correct += int((logits.argmax(1) == yb).sum())
                    loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
        finally:
            for layer in quantized_layers(self.model).values():
                layer._wq_cache = None
            if was_training:
                self._train_mode()
        n = len(x)
        return {"n": n, "top1": 100.0 * correct / n, "loss": loss_sum / n}

    def _evaluate_now(self) -> dict[str, Any] | None:
        if self.eval_data is None:
            return None
        if self.recipe.bn == "reestimate":
            self._reestimate_bn()
        return self.evaluate()

    # --- loss -------------------------------------------------------------------------------------
    def _loss(self, xb: torch.Tensor, yb: torch.Tensor, step: int) -> torch.Tensor:
        r = self.recipe
        with self._autocast():
            logits = self.model(xb)
        logits = logits.float()
        loss = F.cross_entropy(logits, yb)
        if self.teacher is not None:
            with torch.no_grad(), self._autocast():
                t_logits = self.teacher(xb)
            t = r.distill_temperature
            kd = F.kl_div(
                F.log_softmax(logits / t, dim=1), F.log_softmax(t_logits.float() / t, dim=1),
                reduction="batchmean", log_target=True,
            ) * (t * t)
            loss = (1 - r.distill_alpha) * loss + r.distill_alpha * kd
        if r.binreg_lambda > 0 and step >= r.binreg_start:
            br = binreg_loss(self.model)
            if br is not None:
                loss = loss + r.binreg_lambda * br
        if r.pact_l2 > 0:
            pen = pact_l2_penalty(self.model)
            if pen is not None:
                loss = loss + r.pact_l2 * pen
        return loss

    # --- checkpoints ------------------------------------------------------------------------------
    def _load_checkpoint(self, path: Path) -> dict[str, Any]:
        return read_checkpoint(path, self.recipe)

    def _save_checkpoint(self, seconds: float, train_seconds: float) -> Path | None:
        if self.checkpoint_dir is None:
            return None
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        epoch, pos = divmod(self.step, self.steps_per_epoch)
        state = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "step": self.step,
            "total_steps": self.total_steps,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "layers": json.dumps(self._layout()),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "allocation": self.allocation.to_json(indent=None),
            "recipe": json.dumps(self.recipe.to_dict()),
            "rng": _rng_state(),
            "data": {"epoch": epoch, "position": pos, "n": len(self.train_x), "batch_size": self.batch_size},
            "history": json.dumps(self.history),
            "initial_metrics": json.dumps(self.initial_metrics),
            "seconds": float(seconds),
            "train_seconds": float(train_seconds),
        }
        self.checkpoint_path = write_checkpoint(self.checkpoint_dir, state)
        return self.checkpoint_path

    # --- the loop ---------------------------------------------------------------------------------
    def _call_callbacks(self, state: StepState) -> None:
        for cb in self.callbacks:
            fn = cb.on_step if hasattr(cb, "on_step") else cb
            ret = fn(state)
            if isinstance(ret, Allocation):
                self.set_allocation(ret)
                state.allocation = self.allocation

    def run(self) -> QATResult:
        r = self.recipe
        caller_rng = _rng_state()
        t0 = time.perf_counter()
        train_time = 0.0
        stopped = False
        try:
            if self._rng_resume is not None:
                _set_rng_state(self._rng_resume)
            else:
                torch.manual_seed(r.seed)
                random.seed(r.seed)
                np.random.seed(r.seed)
                if self.device.type == "cuda":
                    torch.cuda.manual_seed_all(r.seed)
                if self.step == 0 and self.eval_data is not None:
                    self.initial_metrics = self.evaluate()
            self._train_mode()
            while self.step < self.total_steps:
                ts = time.perf_counter()
                xb, yb = self._batch(self.step)
                lr = self.optimizer.param_groups[0]["lr"]
                loss = self._loss(xb, yb, self.step)
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    raise BitsearchError(f"the QAT loss became {loss_value} at step {self.step}; lower the lr")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if r.grad_clip is not None:
                    params = [p for g in self.optimizer.param_groups for p in g["params"]]
                    torch.nn.utils.clip_grad_norm_(params, r.grad_clip)
                self.optimizer.step()
                self.scheduler.step()
                self.step += 1
                train_time += time.perf_counter() - ts
                record: dict[str, Any] = {"step": self.step, "loss": loss_value, "lr": lr}
                metrics = None
                if r.eval_every and self.step % r.eval_every == 0 and self.step < self.total_steps:
                    metrics = self._evaluate_now()
                    if metrics is not None:
                        record["eval"] = metrics
                self.history.append(record)
                state = StepState(
                    step=self.step, total_steps=self.total_steps, epoch=self.step // self.steps_per_epoch,
                    loss=loss_value, lr=lr, seconds=self.seconds_before + time.perf_counter() - t0,
                    allocation=self.allocation, model=self.model, trainer=self, metrics=metrics,
                )
                self._call_callbacks(state)
                stopped = state.stop_requested or self._stop.is_set()
                due = r.checkpoint_every and self.step % r.checkpoint_every == 0
                if (due or stopped) and self.step < self.total_steps:
                    self._save_checkpoint(
                        self.seconds_before + time.perf_counter() - t0, self.train_seconds_before + train_time
                    )
                if stopped:
                    break
            # A run stopped early already wrote its checkpoint above; what follows (BN re-estimation, the
            # evaluation) only touches the model in memory, so resuming it stays bit-exact.
            if r.bn == "reestimate":
                self._reestimate_bn()
            metrics = self.evaluate() if self.eval_data is not None else {}
            seconds = self.seconds_before + time.perf_counter() - t0
            train_seconds = self.train_seconds_before + train_time
            if self.step >= self.total_steps:
                self.history.append({"step": self.step, "final": metrics})
                self._save_checkpoint(seconds, train_seconds)
        finally:
            _set_rng_state(caller_rng)
        self.model.eval().to(self.home_device)
        result = QATResult(
            metrics=metrics, steps=self.step, seconds=seconds, history=self.history, allocation=self.allocation,
            checkpoint=self.checkpoint_path, model=self.model, recipe=r, stopped=stopped,
            initial_metrics=self.initial_metrics, train_seconds=train_seconds, device=str(self.device),
        )
        for cb in self.callbacks:
            if hasattr(cb, "on_end"):
                cb.on_end(result)
        return result
