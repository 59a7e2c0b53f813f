"""The one-call API: `search`, `quantize`, `sensitivity`, `finetune`."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from quant import Allocation, QuantConfig
from quant.errors import BitsearchError

from . import models
from .data import ResolvedData, resolve_data, resolve_training_data
from .pipeline import run_search
from .result import SearchResult
from .spec import SearchSpec

ProgressFn = Callable[[float, str], None]

#: Keyword shortcuts of `search` and the spec fields they set.
SHORTCUTS = {"method": ("sensitivity", "method"), "solver": ("solver", "name"), "pareto": ("pareto_points",)}


def _is_ref(x: Any) -> bool:
    return isinstance(x, str)


def build_spec(model: Any = None, data: Any = None, *, spec: SearchSpec | Mapping[str, Any] | None = None,
               **fields: Any) -> SearchSpec:
    """A `SearchSpec` from keyword arguments: spec fields by name (`budgets`, `options`, `seed`, ...) and the
    shortcuts `method`, `solver`, `pareto`; references for `model`/`data` go into the spec."""
    base = SearchSpec.parse(spec).model_dump() if spec is not None else {}
    for short, path in SHORTCUTS.items():
        value = fields.pop(short, None)
        if value is None:
            continue
        if len(path) == 1:
            base[path[0]] = value
        else:
            base.setdefault(path[0], {})
            base[path[0]] = {**base[path[0]], path[1]: value}
    base.update({k: v for k, v in fields.items() if v is not None})
    if _is_ref(model):
        base["model"] = model
    if _is_ref(data):
        base["data"] = data
    return SearchSpec.parse(base)


def search(
    model: Any,
    data: Any = None,
    *,
    budgets: Sequence[str | Mapping[str, Any]] | None = None,
    method: str | None = None,
    solver: str | None = None,
    pareto: int | None = None,
    spec: SearchSpec | Mapping[str, Any] | None = None,
    roles: Mapping[str, Any] | None = None,
    example_input: torch.Tensor | None = None,
    progress: ProgressFn | None = None,
    **fields: Any,
) -> SearchResult:
    """Search per-layer bit-widths for `model` under `budgets`; returns a typed `SearchResult`.

    model: an `nn.Module`, a `torch.export` `ExportedProgram`, "zoo:NAME" or a `.pt2` path.
    data:  an `ArrayDataset`, numpy/torch `(x, y)` arrays, an `.npz` path, "zoo:NAME", "none" (data-free)
           or None (a zoo model's own data). It is split into calibration, selection and report roles
           (see `bitsearch.data`); `roles` sets any of them ("train", "calibration", "selection", "report")
           to its own data object or reference.
    budgets: e.g. ["avg_wbits=3", "bops<=1.2e9"]. method / solver / pareto: the sensitivity method, the
           allocation solver and the number of points of the Pareto sweep. Any other `SearchSpec` field may
           be given by name (`options={"keep_first_last": True}`, `seed=1`, ...), or a whole `spec`.
    """
    s = build_spec(model, data, spec=spec, budgets=budgets, method=method, solver=solver, pareto=pareto,
                   **fields)
    obj_model = None if _is_ref(model) else model
    obj_data = None if data is None or _is_ref(data) else data
    obj_roles = None
    if roles:
        obj_roles = dict(roles)
    return run_search(s, progress, model=obj_model, data=obj_data, roles=obj_roles, example_input=example_input)


def _loaded(model: Any, data_like: Any = None, example_input: torch.Tensor | None = None):
    if isinstance(model, nn.Module) and example_input is None and data_like is not None:
        example_input = data_like.x[:2]
    return models.load(model, None, example_input)


def quantize(
    model: Any,
    allocation: Allocation | Mapping[str, Any] | str,
    calibration: Any = None,
    config: QuantConfig | Mapping[str, Any] | None = None,
) -> nn.Module:
    """A fake-quantized copy of `model` at `allocation` (an `Allocation`, its dict, or a JSON file path).

    `calibration`: data (any `as_dataset` input, or a zoo/.npz reference) for activation ranges and
    data-driven clipping; needed when any activation is quantized.
    """
    from pathlib import Path

    from quant import apply_allocation

    if isinstance(allocation, (str, Path)):
        allocation = Allocation.load(allocation)
    elif isinstance(allocation, Mapping):
        allocation = Allocation.from_dict(allocation)
    if isinstance(config, Mapping):
        config = QuantConfig.from_dict(dict(config))
    calib = None
    if calibration is not None:
        if isinstance(calibration, str):
            loaded = models.load(model) if not isinstance(model, nn.Module) else None
            norm = loaded.normalisation if loaded else None
            calib = resolve_data(calibration, normalisation=norm).calibration
        else:
            from zoo.data import as_dataset

            calib = as_dataset(calibration, "calibration")
    target = model if isinstance(model, nn.Module) else models.load(model).model
    return apply_allocation(target, allocation, calib, config)


def sensitivity(
    model: Any,
    data: Any = None,
    *,
    method: str | None = None,
    weight_bits: Sequence[int] | None = None,
    activation_bits: Sequence[int] | None = None,
    samples: int | None = None,
    settings: Mapping[str, Any] | None = None,
    seed: int = 0,
    example_input: torch.Tensor | None = None,
    progress: ProgressFn | None = None,
):
    """The per-layer, per-option sensitivity table (`SensitivityTable`) of `model` on `data`'s calibration
    role (defaults from `SearchSpec`)."""
    from sensitivity import SensitivityOptions, compute_sensitivity

    options: dict[str, Any] = {}
    if weight_bits is not None:
        options["weight_bits"] = list(weight_bits)
    if activation_bits is not None:
        options["activation_bits"] = list(activation_bits)
    sens = {k: v for k, v in {"method": method, "samples": samples, "settings": settings}.items() if v is not None}
    s = build_spec(model, data, options=options, sensitivity=sens, seed=seed)
    from .pipeline import prepare

    loaded, resolved = prepare(s, None if _is_ref(model) else model, None if _is_ref(data) else data,
                               example_input=example_input)
    opts = SensitivityOptions(tuple(s.options.weight_bits), tuple(s.options.activation_bits),
                              samples=s.sensitivity.samples, seed=s.seed, params=dict(s.sensitivity.settings))
    return compute_sensitivity(loaded.model, resolved.calibration, s.sensitivity.method, opts, progress=progress,
                               example_input=loaded.example_input)


def finetune(
    model: Any,
    allocation: Allocation | Mapping[str, Any] | str,
    data: Any = None,
    *,
    recipe: Any = None,
    roles: Mapping[str, Any] | None = None,
    seed: int = 0,
    checkpoint_dir: Any = None,
    callbacks: Any = None,
):
    """Quantization-aware fine-tuning of `model` at `allocation` on `data` (the training data: a zoo set,
    an .npz file or arrays; a held-out part, or the zoo set's test split, scores the result). `recipe`: a
    `quant.qat.QATRecipe` or its dict. Returns a `quant.qat.QATResult`."""
    from pathlib import Path

    from quant.qat import QATRecipe
    from quant.qat import finetune as qat_finetune

    if isinstance(allocation, (str, Path)):
        allocation = Allocation.load(allocation)
    elif isinstance(allocation, Mapping):
        allocation = Allocation.from_dict(allocation)
    if recipe is None or isinstance(recipe, Mapping):
        recipe = QATRecipe.from_dict(dict(recipe or {}))
    loaded = None if isinstance(model, nn.Module) else models.load(model)
    resolved: ResolvedData = resolve_training_data(
        data, roles, normalisation=loaded.normalisation if loaded else None,
        model_dataset=loaded.spec.dataset if loaded else None, seed=seed,
        num_classes=loaded.num_classes if loaded else None)
    target = loaded.model if loaded else model
    if resolved.train is None:
        raise BitsearchError("fine-tuning needs training data")
    return qat_finetune(target, allocation, resolved.train, recipe, callbacks=callbacks,
                        calibration=resolved.calibration, eval_data=resolved.report, checkpoint_dir=checkpoint_dir)
