"""What the service stores about an upload: its layers, or its items and classes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from quant.errors import BitsearchError

from ..data import Normalisation
from ..models import LoadedModel, get_model_spec, load_state_dict_checked
from .npz import NpzLimits, describe_npz
from .rebuild import load_exported_model

# --------------------------------------------------------------------------------------------------------------
# Inspecting uploads (what the service stores about them)


def _layers_info(loaded: LoadedModel) -> dict[str, Any]:
    from quant.layers import discover_layers

    layers = discover_layers(loaded.model, loaded.example_input)
    return {
        "input_shape": list(loaded.spec.input_shape),
        "num_classes": loaded.num_classes,
        "layers": [{"name": l.name, "kind": l.kind, "params": l.params, "macs": l.macs} for l in layers],
        "layer_count": len(layers),
        "params": int(sum(l.params for l in layers)),
    }


def inspect_exported_upload(path: str | Path, normalisation: Normalisation | None = None) -> dict[str, Any]:
    return {**_layers_info(load_exported_model(path, normalisation=normalisation)), "format": "pt2"}


def inspect_safetensors_upload(path: str | Path, architecture: str) -> dict[str, Any]:
    """Check that the safetensors file fits the zoo architecture (names, shapes, float dtypes)."""
    spec = get_model_spec(architecture)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise BitsearchError(f"not a readable safetensors file: {exc}") from None
    if not state:
        raise BitsearchError("the safetensors file holds no tensors")
    state = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = spec.builder()
    load_state_dict_checked(model, state, "the uploaded file")
    model.eval()
    example = torch.randn((2, *spec.input_shape), generator=torch.Generator().manual_seed(0))
    loaded = LoadedModel(spec.name, model, example, spec.num_classes, spec.normalisation, spec)
    return {**_layers_info(loaded), "format": "safetensors", "architecture": spec.ref}


def inspect_dataset_upload(path: str | Path, normalisation: Normalisation | None = None,
                           limits: NpzLimits | None = None) -> dict[str, Any]:
    """Validate an ``.npz`` (never unpickling) and describe it: sizes checked from the NPY headers against
    `limits` before any array is read, then the arrays read in bounded chunks (see `zoo.uploads.npz`).
    `normalisation` does not change the description; it is accepted for the callers that pass it."""
    return describe_npz(path, limits)
