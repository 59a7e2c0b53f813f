"""Export and profiling from the same inputs a search uses: shared by `bitsearch export/profile` and REST.

The export must see the fake-quant model the search measured, so it is rebuilt from the search's spec: the
same model, weights, calibration split (seeded) and quantization config, then `quant.export.onnx_qdq`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from quant import Allocation, apply_allocation
from quant.apply import search_quant_config
from quant.errors import BitsearchError

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def provider_name(flag: str) -> str:
    """`cpu`, `cuda`, `tensorrt`, or a full ONNX Runtime provider name."""
    name = PROVIDERS.get(flag.lower(), flag)
    if not name.endswith("ExecutionProvider"):
        raise BitsearchError(f"unknown execution provider {flag!r}; use one of {sorted(PROVIDERS)} or a full name")
    return name


@dataclass
class Exported:
    result: Any  # quant.export.onnx_qdq.ExportResult
    qmodel: Any
    inputs: Any  # service.pipeline.Inputs

    def to_bytes(self) -> bytes:
        return self.result.to_bytes()


def export_allocation(
    spec: dict[str, Any],
    allocation: Allocation | str,
    int4: str = "auto",
    opset: int | None = None,
    fold_batchnorm: bool = False,
) -> Exported:
    """The QDQ ONNX model of `allocation` (or uniform bits such as "8/8") for the model, data and
    quantization config of a search spec."""
    from quant.export.onnx_qdq import ExportConfig, export_onnx
    from service.pipeline import resolve_inputs

    export_config = ExportConfig(int4=int4, opset=opset, fold_batchnorm=fold_batchnorm)  # validate before loading anything
    data = spec.get("data")
    data_free = data == "none"
    inputs = resolve_inputs(
        spec["model"], spec.get("weights"), None if data_free else data, spec.get("calib_data"),
        int(spec.get("calib_size") or 256), None, int(spec.get("seed") or 0),
    )
    # realised as the search realised it: its PTQ recipe under the user's settings (plain QuantConfig defaults
    # when it had no calibration data), so the exported model is the one whose accuracy the front shows
    config = search_quant_config(spec.get("quant"), calibration_available=inputs.calibration is not None)
    if isinstance(allocation, str):
        allocation = Allocation.uniform(inputs.layer_names, allocation, model=spec["model"])
    allocation.check_layers(inputs.layer_names)
    calibration = inputs.calibration
    needs_data = any(b.activation_bits < 16 for b in allocation.layers.values())
    if calibration is None and needs_data:
        if not data_free:
            raise BitsearchError("quantized activations need calibration data: give data or calib_data")
        from sensitivity.datafree import distill_inputs

        calibration = distill_inputs(
            inputs.loaded.model, inputs.loaded.example_input, int(spec.get("calib_size") or 256),
            seed=int(spec.get("seed") or 0),
        )
    qmodel = apply_allocation(inputs.loaded.model, allocation, calibration=calibration, config=config)
    example = inputs.loaded.example_input
    result = export_onnx(qmodel, example, allocation=allocation, config=export_config,
                         quant_config=config.to_dict())
    return Exported(result, qmodel, inputs)
