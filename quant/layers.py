"""Discovery of the quantizable layers of any `torch.nn.Module`.

One forward pass on an example input, with hooks on every quantizable module, records what the cost model
and the solvers need: weight shape, parameter count, MACs per sample and the input-activation size.
Names are the module's qualified name in `model.named_modules()`, so they are stable across runs and match
`state_dict` keys.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import BitsearchError

QUANTIZABLE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.Linear,
    nn.ConvTranspose2d,
)


@dataclass
class LayerInfo:
    """One quantizable layer as seen in one forward pass of one sample."""

    name: str
    kind: str  # "Conv2d", "Linear", ...
    weight_shape: tuple[int, ...]
    params: int  # weight elements (the bias stays in high precision and is not counted)
    bias: bool
    macs: int  # multiply-accumulates per sample, summed over every call of the module
    input_shape: tuple[int, ...]  # per sample (batch dimension dropped), first call
    output_shape: tuple[int, ...]  # per sample, first call
    calls: int = 1  # >1 when the module is shared and runs more than once per forward
    # Rows of the weight (dim 0): the count of per-channel scales. Output channels for Conv/Linear, input
    # channels for ConvTranspose, whose weight is (C_in, C_out/groups, k, k).
    out_channels: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # stride, padding, groups...
    # Other parameters that are this layer's weight tensor (a tied embedding, e.g. "model.embed_tokens.weight"):
    # the tensor is stored, counted and quantized once, as this layer.
    tied_with: tuple[str, ...] = ()

    @property
    def input_numel(self) -> int:
        """Input-activation elements per sample (summed over calls: each call's input is held once)."""
        return math.prod(self.input_shape) * self.calls

    @property
    def shape_key(self) -> str:
        """A key that identifies the layer's shape, for latency tables shared between models."""
        kw = ",".join(f"{k}={v}" for k, v in sorted(self.extra.items()))
        w = "x".join(map(str, self.weight_shape))
        i = "x".join(map(str, self.input_shape))
        return f"{self.kind}(w={w},in={i}{',' + kw if kw else ''})"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["weight_shape"] = list(self.weight_shape)
        d["input_shape"] = list(self.input_shape)
        d["output_shape"] = list(self.output_shape)
        d["tied_with"] = list(self.tied_with)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerInfo":
        d = dict(d)
        for k in ("weight_shape", "input_shape", "output_shape"):
            d[k] = tuple(d[k])
        d["tied_with"] = tuple(d.get("tied_with", ()))
        return cls(**d)


def is_quantizable(module: nn.Module) -> bool:
    return isinstance(module, QUANTIZABLE_TYPES) and getattr(module, "weight", None) is not None


def _macs(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    w = module.weight
    if isinstance(module, nn.Linear):
        # Every leading dimension (tokens, positions) is one more matrix-vector product.
        return int(out[0].numel() * w.shape[1])
    if isinstance(module, nn.ConvTranspose2d):
        # Each input element is scattered through the whole kernel slice of its group.
        c_in = w.shape[0]
        per_input = w.shape[1] * math.prod(w.shape[2:])
        return int(inp[0].numel() * per_input) if c_in else 0
    # Conv: every output element costs (C_in / groups) * prod(kernel) MACs.
    return int(out[0].numel() * math.prod(w.shape[1:]))


def _extra(module: nn.Module) -> dict[str, Any]:
    """Stride, padding, dilation and groups where they differ from the defaults (for `shape_key`)."""
    if isinstance(module, nn.Linear):
        return {}
    defaults = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1}
    out: dict[str, Any] = {}
    for k, default in defaults.items():
        v = getattr(module, k, default)
        if isinstance(v, tuple) and len(set(v)) == 1:
            v = v[0]
        if v != default:
            out[k] = list(v) if isinstance(v, tuple) else v
    return out


def _as_tuple(x: Any) -> tuple:
    return x if isinstance(x, tuple) else (x,)


@torch.no_grad()
def discover_layers(model: nn.Module, example_input: Any) -> list[LayerInfo]:
    """Return the quantizable layers of `model` in execution order.

    `example_input` is one batch (a tensor, or a tuple of positional arguments) that the model accepts;
    figures are per sample, so any batch size works.
    """
    named = [(n, m) for n, m in model.named_modules() if is_quantizable(m)]
    if not named:
        types = ", ".join(t.__name__ for t in QUANTIZABLE_TYPES)
        raise BitsearchError(f"the model has no quantizable layer (looked for {types} with a weight)")
    found: dict[str, LayerInfo] = {}
    order: list[str] = []
    handles = []

    def hook(name: str):
        def fn(module: nn.Module, args: tuple, output: Any) -> None:
            if not args or not torch.is_tensor(args[0]) or not torch.is_tensor(output):
                return
            inp = args[0]
            macs = _macs(module, inp, output)
            if name in found:
                found[name].calls += 1
                found[name].macs += macs
                return
            w = module.weight
            found[name] = LayerInfo(
                name=name,
                kind=type(module).__name__,
                weight_shape=tuple(w.shape),
                params=w.numel(),
                bias=getattr(module, "bias", None) is not None,
                macs=macs,
                input_shape=tuple(inp.shape[1:]),
                output_shape=tuple(output.shape[1:]),
                out_channels=int(w.shape[0]),
                extra=_extra(module),
            )
            order.append(name)

        return fn

    for name, module in named:
        handles.append(module.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        args = _as_tuple(example_input)
        model(*args)
    except BitsearchError:
        raise
    except Exception as exc:  # the user's model rejected the input: say so plainly
        shapes = ", ".join(str(tuple(a.shape)) if torch.is_tensor(a) else type(a).__name__ for a in args)
        raise BitsearchError(
            f"the example input ({shapes}) does not fit the model: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not order:
        raise BitsearchError("no quantizable layer ran in the forward pass on the example input")
    _mark_tied_weights(model, found)
    return [found[n] for n in order]


def _mark_tied_weights(model: nn.Module, found: dict[str, LayerInfo]) -> None:
    """Fill `tied_with`: every other name under which a layer's weight tensor is a parameter."""
    names_of: dict[int, list[str]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False):
            names_of.setdefault(id(p), []).append(f"{mname}.{pname}" if mname else pname)
    for name, info in found.items():
        w = model.get_submodule(name).weight
        own = f"{name}.weight"
        info.tied_with = tuple(sorted({n for n in names_of.get(id(w), []) if n != own}))


#: Sibling layers that runtimes fuse into one matrix product (one input, one format), as ModelOpt and
#: AutoRound do: attention q/k/v projections, the MLP's gate and up projections (Hugging Face decoder names).
TIE_PATTERNS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
)


def default_tie_groups(layers: list[LayerInfo]) -> list[tuple[str, ...]]:
    """Default tie groups of a transformer's layers: siblings (same parent module) named as in
    `TIE_PATTERNS`, two or more of them present. Empty for models without such layers (CNNs)."""
    children: dict[str, dict[str, str]] = {}
    for info in layers:
        parent, _, leaf = info.name.rpartition(".")
        children.setdefault(parent, {})[leaf] = info.name
    groups = []
    for leaves in children.values():
        for pattern in TIE_PATTERNS:
            members = tuple(leaves[p] for p in pattern if p in leaves)
            if len(members) >= 2:
                groups.append(members)
    return groups
