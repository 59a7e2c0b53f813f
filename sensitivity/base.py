"""The one entry point, `compute_sensitivity`, and the registry of methods behind it.

Adding a method is one module with one class registered here, as Optuna registers samplers:

    @register_method
    class MyMethod(SensitivityMethod):
        name = "mine"
        def compute(self, ctx: SensitivityContext) -> SensitivityTable: ...
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from quant.allocation import LayerBits, check_bits
from quant.apply import QuantConfig
from quant.errors import BitsearchError
from quant.registry import Capabilities, Registry
from quant.layers import LayerInfo, discover_layers

from .table import SensitivityTable

#: Every sensitivity method by name; a second method under a taken name is refused.
METHODS: Registry[type["SensitivityMethod"]] = Registry("sensitivity method")

ProgressFn = Callable[[float, str], None]  # (fraction done, message)


def register_method(cls: type["SensitivityMethod"]) -> type["SensitivityMethod"]:
    return METHODS.register(cls)


@dataclass
class SensitivityOptions:
    """What to measure and how. Defaults need no tuning for CIFAR-sized models on a laptop CPU."""

    weight_bits: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
    activation_bits: tuple[int, ...] = (32,)  # 32: weights only; e.g. (4, 8, 32) for activations too
    samples: int = 256  # data samples the method may use (each method documents how)
    batch_size: int = 64
    seed: int = 0
    quant: QuantConfig = field(default_factory=QuantConfig)  # how each option is realised
    params: dict[str, Any] = field(default_factory=dict)  # method-specific settings
    #: Named weight schemes (`quant.formats`: "int4-g128", "mxfp4", "nvfp4", "fp8-e4m3", ...) priced besides
    #: `weight_bits`; each is combined with every activation option. Set weight_bits=() for schemes only.
    schemes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.weight_bits = tuple(check_bits(b, "weight bit option") for b in self.weight_bits)
        self.activation_bits = tuple(check_bits(b, "activation bit option") for b in self.activation_bits)
        if isinstance(self.schemes, str):
            self.schemes = (self.schemes,)
        self.schemes = tuple(dict.fromkeys(LayerBits.of(s).scheme_name for s in self.schemes))
        if not (self.weight_bits or self.schemes) or not self.activation_bits:
            raise BitsearchError("at least one weight (bits or scheme) and one activation bit option are needed")
        if self.samples < 1 or self.batch_size < 1:
            raise BitsearchError("samples and batch_size must be positive")

    @property
    def options(self) -> list[LayerBits]:
        legacy = [LayerBits(w, a) for w, a in itertools.product(self.weight_bits, self.activation_bits)]
        named = [LayerBits.of(s, a) for s, a in itertools.product(self.schemes, self.activation_bits)]
        return legacy + [o for o in named if o not in legacy]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["quant"] = self.quant.to_dict()
        d["weight_bits"], d["activation_bits"] = list(self.weight_bits), list(self.activation_bits)
        d["schemes"] = list(self.schemes)
        return d


@dataclass
class SensitivityContext:
    """Everything a method gets: the float model (eval mode), its layers, data and options."""

    model: nn.Module
    layers: list[LayerInfo]
    x: torch.Tensor  # (N, ...) inputs, at most options.samples
    y: torch.Tensor | None  # labels, or None: methods use the float model's own predictions
    options: SensitivityOptions
    data_info: dict[str, Any]
    progress: ProgressFn

    def batches(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        bs = self.options.batch_size
        return [
            (self.x[i : i + bs], None if self.y is None else self.y[i : i + bs])
            for i in range(0, self.x.shape[0], bs)
        ]

    def modules(self) -> dict[str, nn.Module]:
        named = dict(self.model.named_modules())
        return {l.name: named[l.name] for l in self.layers}


class SensitivityMethod:
    """Interface of a sensitivity method."""

    name: ClassVar[str] = ""
    #: True when the method prices every option of `SensitivityOptions.options` (named schemes included),
    #: not only integer bit-widths.
    supports_schemes: ClassVar[bool] = False
    covers_activations: ClassVar[bool] = False
    needs_labels: ClassVar[bool] = False  # False: falls back to the model's own predictions
    #: What the method needs from a run (checked by `POST /search` before queueing).
    capabilities: ClassVar[Capabilities] = Capabilities()

    @dataclass
    class Config:
        """The method's settings (`SensitivityOptions.params`); a method with settings defines its own."""

    def compute(self, ctx: SensitivityContext) -> SensitivityTable:
        raise NotImplementedError


def _no_progress(frac: float, msg: str) -> None:
    pass


def check_schemes(method: str, schemes) -> None:
    """Refuse (BitsearchError) named weight schemes for a method that prices integer bit-widths only."""
    if schemes and method in METHODS and not METHODS[method].supports_schemes:
        able = sorted(n for n, m in METHODS.items() if m.supports_schemes)
        raise BitsearchError(
            f"the {method!r} method prices integer bit-widths only, not the schemes {list(schemes)}; "
            f"use one of {able}"
        )


def compute_sensitivity(
    model: nn.Module,
    data: Any,
    method: str = "hessian",
    options: SensitivityOptions | None = None,
    progress: ProgressFn | None = None,
    example_input: torch.Tensor | None = None,
) -> SensitivityTable:
    """Measure every quantizable layer's sensitivity to every bit option of `options`.

    `data`: a dataset with `.x` (and optional `.y`), an `(x, y)` tuple, an input tensor, or None for
    data-free mode (inputs distilled from the BatchNorm statistics; needs `example_input` for the shape).
    """
    if method not in METHODS:
        raise BitsearchError(f"unknown sensitivity method {method!r}; known: {sorted(METHODS)}")
    options = options or SensitivityOptions()
    METHODS.check(method, options.params)  # a misspelled setting is an error, never ignored
    impl = METHODS[method]()
    progress = progress or _no_progress
    torch.manual_seed(options.seed)
    check_schemes(method, options.schemes)
    model = model.eval()
    x, y, data_info = _resolve_data(model, data, options, example_input, progress)
    if impl.needs_labels and y is None:
        raise BitsearchError(f"the {method!r} method needs labelled data")
    layers = discover_layers(model, x[:2])
    ctx = SensitivityContext(model, layers, x, y, options, data_info, progress)
    t0 = time.perf_counter()
    table = impl.compute(ctx)
    table.cost.setdefault("seconds", time.perf_counter() - t0)
    table.settings = {**options.to_dict(), **table.settings}
    table.data = {**data_info, **table.data}
    table.covers_activations = impl.covers_activations
    return table


def _resolve_data(model, data, options, example_input, progress):
    y = None
    name = None
    if data is None:
        from .datafree import distill_inputs  # only data-free runs pay for it

        if example_input is None:
            raise BitsearchError("data-free sensitivity needs an example input (for the input shape)")
        x = distill_inputs(model, example_input, options.samples, seed=options.seed, progress=progress)
        return x, None, {"name": "distilled from BatchNorm statistics", "samples": x.shape[0],
                         "data_free": True, "labels": False}
    from zoo.data import as_dataset  # zoo needs only quant.errors: no cycle

    ds = as_dataset(data, "the sensitivity data")
    x, y, name = ds.x, ds.y, getattr(data, "name", None)
    if not torch.is_tensor(x) or x.shape[0] == 0:
        raise BitsearchError("the sensitivity data are empty")
    if x.shape[0] > options.samples:
        g = torch.Generator().manual_seed(options.seed)
        idx = torch.randperm(x.shape[0], generator=g)[: options.samples]
        x = x[idx]
        y = None if y is None else y[idx]
    return x, y, {"name": name, "samples": int(x.shape[0]), "data_free": False, "labels": y is not None}
