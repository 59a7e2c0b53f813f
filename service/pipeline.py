"""The stages of the data path the service runs, as plain functions over typed objects.

`run_search` is `bitsearch.pipeline.run_search` (a `SearchSpec` in, a typed `SearchResult` out); the CLI,
the REST workers and the Python API all run it. `resolve_inputs` turns references into a model and data
(through `bitsearch.data`, the one place data roles are resolved), `run_ptq` quantizes and measures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from bitsearch.data import ResolvedData, resolve_data
from bitsearch.pipeline import run_search
from quant import Allocation, LayerBits, QuantConfig, apply_allocation, discover_layers
from quant.cost import CostModel
from quant.errors import BitsearchError
from quant.layers import LayerInfo
from zoo import ArrayDataset, EvalResult, LoadedModel, evaluate
from zoo.uploads import load_any_model

ProgressFn = Callable[[str], None]


@dataclass
class Inputs:
    """A model with its layers, and the data to calibrate on and to evaluate on (disjoint)."""

    loaded: LoadedModel
    layers: list[LayerInfo]
    calibration: ArrayDataset | None
    evaluation: ArrayDataset | None
    notes: list[str] = field(default_factory=list)
    data: ResolvedData | None = None

    @property
    def layer_names(self) -> list[str]:
        return [l.name for l in self.layers]


def resolve_inputs(
    model_ref: str,
    weights: str | None = None,
    data_ref: str | None = None,
    calib_ref: str | None = None,
    calib_size: int = 256,
    eval_limit: int | None = None,
    seed: int = 0,
) -> Inputs:
    """Load the model and its data (calibration and evaluation roles, see `bitsearch.data.resolve_data`).

    Without `data_ref`, a zoo model's own data set is used; "none": no calibration data (data-free).
    Calibration comes from `calib_ref` when given, else from the data set's calibration split, else from a
    random part of the data that is then held out of the evaluation (said in `notes`).
    """
    loaded = load_any_model(model_ref, weights)
    roles = {"calibration": calib_ref} if calib_ref is not None else None
    resolved = resolve_data(data_ref, roles, normalisation=loaded.normalisation,
                            model_dataset=loaded.spec.dataset, calib_size=calib_size, eval_limit=eval_limit,
                            seed=seed, num_classes=loaded.num_classes, select=False)
    calibration = resolved.calibration
    if calib_ref is not None and calibration is not None:
        calibration = calibration.take(calib_size, seed=seed)
    example = loaded.example_input if calibration is None else calibration.x[:2]
    layers = discover_layers(loaded.model, example)
    return Inputs(loaded, layers, calibration, resolved.report, list(loaded.warnings) + resolved.notes, resolved)


@dataclass
class PTQResult:
    """One quantized variant of the model: its allocation, what it costs and how well it does."""

    label: str
    allocation: Allocation
    cost: dict[str, Any]
    metrics: dict[str, Any]  # EvalResult fields (top1, loss, agreement, kl); empty without evaluation data

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "allocation": self.allocation.to_dict(),
            "cost": self.cost,
            "metrics": self.metrics,
        }


def _metrics(result: EvalResult | None) -> dict[str, Any]:
    return {} if result is None else result.to_dict()


def run_ptq(
    inputs: Inputs,
    allocations: list[tuple[str, Allocation]],
    config: QuantConfig | None = None,
    progress: ProgressFn | None = None,
) -> tuple[PTQResult, list[PTQResult]]:
    """Post-training quantization of each allocation; returns the FP32 reference and the quantized results."""
    config = config or QuantConfig()
    progress = progress or (lambda msg: None)
    cost_model = CostModel(inputs.layers, weight_granularity=config.weight_granularity)
    model = inputs.loaded.model
    ev = inputs.evaluation
    progress("evaluating FP32")
    fp = evaluate(model, ev) if ev is not None else None
    fp32_alloc = Allocation.uniform(inputs.layer_names, LayerBits(32, 32), model=inputs.loaded.spec.ref)
    reference = PTQResult("FP32", fp32_alloc, cost_model.cost(fp32_alloc).to_dict(), _metrics(fp))
    results = []
    for label, alloc in allocations:
        progress(f"quantizing {label}")
        qmodel = apply_allocation(model, alloc, inputs.calibration, config)
        progress(f"evaluating {label}")
        res = evaluate(qmodel, ev, reference_logits=fp.logits if fp else None) if ev is not None else None
        results.append(PTQResult(label, alloc, cost_model.cost(alloc).to_dict(), _metrics(res)))
    return reference, results


#: What `bitsearch ptq` evaluates when given neither bits nor allocations.
DEFAULT_PTQ_BITS = ["8/8", "4/8", "4"]


def checked_allocation(alloc: Allocation, inputs: Inputs) -> Allocation:
    """`alloc`, when it gives an option to exactly the model's quantizable layers."""
    names = set(inputs.layer_names)
    missing, extra = sorted(names - set(alloc.layers)), sorted(set(alloc.layers) - names)
    if missing or extra:
        raise BitsearchError(
            f"the allocation does not fit {inputs.loaded.spec.ref}: "
            + "; ".join(x for x in (f"no option for {missing[:5]}" if missing else "",
                                    f"unknown layers {extra[:5]}" if extra else "") if x)
        )
    return alloc


def uniform_allocations(inputs: Inputs, bits: list[str]) -> list[tuple[str, Allocation]]:
    out = []
    for b in bits:
        lb = LayerBits.parse(b)
        out.append((lb.label(), Allocation.uniform(inputs.layer_names, lb, model=inputs.loaded.spec.ref)))
    if not out:
        raise BitsearchError("give at least one --bits option or an --allocation")
    return out


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)


__all__ = ["Inputs", "PTQResult", "resolve_inputs", "run_ptq", "run_search", "seed_everything",
           "uniform_allocations"]
