"""Any model a user hands bitsearch, as a `zoo.LoadedModel`: an `nn.Module`, a `torch.export`
`ExportedProgram`, a "zoo:NAME" reference or a path to an exported `.pt2` file."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quant.errors import BitsearchError
from zoo import LoadedModel
from zoo.data import Normalisation


def _no_builder() -> nn.Module:
    raise BitsearchError("a model given as an object cannot be rebuilt from scratch")


def from_module(module: nn.Module, example_input: torch.Tensor, normalisation: Normalisation | None = None,
                label: str | None = None) -> LoadedModel:
    if not torch.is_tensor(example_input) or example_input.dim() < 2:
        raise BitsearchError("example_input must be a batch of inputs (a tensor with a leading batch dimension)")
    example = example_input[:2].detach()
    tokens = not example.is_floating_point() and example.dtype != torch.uint8 and example.dim() == 2
    if not tokens:  # token ids (a language model's N×T input) stay integers
        example = example.float()
    module.eval()
    try:
        with torch.no_grad():
            out = module(example)
    except Exception as exc:
        raise BitsearchError(
            f"the model does not run on inputs of shape {tuple(example.shape)}: {type(exc).__name__}: {exc}"
        ) from None
    if not torch.is_tensor(out) or out.dim() != (3 if tokens else 2):
        raise BitsearchError("the model must return one tensor of logits, shape (batch, classes), or for token "
                             "ids (batch, vocab, positions)")
    name = label or f"module:{type(module).__name__}"
    from zoo.uploads import UploadedModelSpec  # a ModelSpec whose ref is its own name, not a zoo name

    spec = UploadedModelSpec(name=name, description=f"a {type(module).__name__} given from Python",
                             input_shape=tuple(example.shape[1:]), num_classes=int(out.shape[1]),
                             normalisation=normalisation, builder=_no_builder, upload_ref=name)
    return LoadedModel(name, module, example, int(out.shape[1]), normalisation, spec, source="python object")


def load(model: Any, weights: str | None = None, example_input: torch.Tensor | None = None,
         normalisation: Normalisation | None = None) -> LoadedModel:
    """A `LoadedModel` from any model a user may give (see the module docstring)."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, (str, Path)):
        from zoo.uploads import load_any_model

        return load_any_model(str(model), weights)
    if isinstance(model, torch.export.ExportedProgram):
        from zoo.uploads import load_exported_model

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.pt2"
            torch.export.save(model, path)
            return load_exported_model(path, ref="exported-program", normalisation=normalisation)
    if isinstance(model, nn.Module):
        if example_input is None:
            raise BitsearchError("a model object needs example inputs: give data (or example_input=...)")
        return from_module(model, example_input, normalisation)
    raise BitsearchError(
        f"model must be an nn.Module, a torch.export ExportedProgram, 'zoo:NAME' or a .pt2 path; "
        f"got {type(model).__name__}"
    )
