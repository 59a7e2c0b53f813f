"""Architecture families: zoo models whose *shape* can change (widths, depths), for architecture search.

A family is a base zoo model plus a discrete search space of shape parameters and a builder that turns one
point of that space (an "architecture", a dict of parameter -> value) into a fresh model:

- `digits-cnn`: a width multiplier per stage (`width1..3`, of 16/32/32 channels) and the number of 3×3 convs
  in the last stage (`depth3`, 1 or 2);
- `digits-mlp`: a width multiplier of the hidden layers (`width`, of 128/64/64) and their number (`depth`,
  1..3; the base has 2);
- `cifar-resnet20` (also 32/44/56): a width multiplier per stage (`width1..3`, of 16/32/64 channels) and the
  number of residual blocks per stage (`depth1..3`, at most the base's n).

Module names follow the base model's, so the base architecture's state dict loads unchanged, and a smaller
architecture can *inherit* the pretrained weights: `inherit_weights` copies, for every tensor whose name exists
in both, the leading slice (first output and input channels; the first blocks of a stage), the usual weight
sharing of one-shot NAS. A tensor the new shape makes larger than the pretrained one is not inherited (it keeps
its random initialisation) and is counted, so a caller can say exactly what was inherited.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quant.errors import BitsearchError

from .models import ZOO_PREFIX, get_model_spec
from .resnet import BasicBlock

Arch = dict[str, Any]


@dataclass(frozen=True)
class Family:
    """A reshapeable zoo model: `space` maps each shape parameter to its allowed values."""

    name: str  # the base zoo model's name
    space: dict[str, tuple[Any, ...]]
    base: Arch  # the base model's own point of the space
    builder: Callable[[Arch, int], nn.Module]  # (architecture, num_classes) -> fresh model
    description: str = ""
    notes: list[str] = field(default_factory=list)

    def check(self, arch: Mapping[str, Any]) -> Arch:
        """`arch` completed with the base's values for missing parameters; an error names a bad one."""
        unknown = sorted(set(arch) - set(self.space))
        if unknown:
            raise BitsearchError(
                f"unknown shape parameter(s) {unknown} for the {self.name} family; it has {sorted(self.space)}"
            )
        out = dict(self.base)
        for k, v in arch.items():
            if v not in self.space[k]:
                raise BitsearchError(f"{self.name}: {k}={v!r} is not one of {list(self.space[k])}")
            out[k] = v
        return out

    def build(self, arch: Mapping[str, Any], num_classes: int = 10, seed: int = 0) -> nn.Module:
        """A fresh model of architecture `arch`, seeded (the caller's RNG is untouched)."""
        full = self.check(arch)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.builder(full, num_classes)

    def restrict(self, space: Mapping[str, Any] | None) -> dict[str, tuple[Any, ...]]:
        """The family's space narrowed to the values a request allows (each must belong to the family)."""
        if not space:
            return dict(self.space)
        out = dict(self.space)
        for k, values in space.items():
            if k not in self.space:
                raise BitsearchError(
                    f"unknown shape parameter {k!r} for the {self.name} family; it has {sorted(self.space)}"
                )
            vals = tuple(values) if isinstance(values, (list, tuple)) else (values,)
            bad = [v for v in vals if v not in self.space[k]]
            if not vals or bad:
                raise BitsearchError(f"{self.name}: {k} values {bad or '[]'} not in {list(self.space[k])}")
            out[k] = vals
        return out


# --- digits CNN ---------------------------------------------------------------------------------------------


class DigitsCNNShape(nn.Module):
    """`zoo.models.DigitsCNN` with per-stage widths and 1-2 convs in the last stage (names conv1.., bn1..)."""

    def __init__(self, widths: tuple[int, int, int], depth3: int, num_classes: int = 10):
        super().__init__()
        chans = [1, widths[0], widths[1]] + [widths[2]] * depth3
        self.n_convs = len(chans) - 1
        for i in range(self.n_convs):
            setattr(self, f"conv{i + 1}", nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False))
            setattr(self, f"bn{i + 1}", nn.BatchNorm2d(chans[i + 1]))
        self.fc = nn.Linear(chans[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, self.n_convs + 1):
            x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
            if i == 2:
                x = F.max_pool2d(x, 2)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _ch(base: int, mult: float) -> int:
    return max(1, int(round(base * mult)))


def _digits_cnn(arch: Arch, num_classes: int) -> nn.Module:
    widths = (_ch(16, arch["width1"]), _ch(32, arch["width2"]), _ch(32, arch["width3"]))
    return DigitsCNNShape(widths, int(arch["depth3"]), num_classes)


# --- digits MLP ---------------------------------------------------------------------------------------------


class DigitsMLPShape(nn.Module):
    """`zoo.models.DigitsMLP` with 1-3 hidden layers of widths 128·w, 64·w, 64·w.

    Names follow the base (`fc1`, `fc2`, output `fc3`); a third hidden layer is `fc2b`, so the output layer
    always inherits the base's output layer.
    """

    def __init__(self, hidden: list[int], num_classes: int = 10):
        super().__init__()
        names = ["fc1", "fc2", "fc2b"][: len(hidden)] + ["fc3"]
        dims = [64] + hidden + [num_classes]
        self.names = names
        for i, n in enumerate(names):
            setattr(self, n, nn.Linear(dims[i], dims[i + 1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for n in self.names[:-1]:
            x = F.relu(getattr(self, n)(x))
        return getattr(self, self.names[-1])(x)


def _digits_mlp(arch: Arch, num_classes: int) -> nn.Module:
    base = [128, 64, 64][: int(arch["depth"])]
    return DigitsMLPShape([_ch(b, arch["width"]) for b in base], num_classes)


# --- CIFAR ResNets ------------------------------------------------------------------------------------------


class _ChannelShortcut(nn.Module):
    """Parameter-free shortcut between any widths: subsample by the stride, zero-pad (or drop) channels.

    For in = out/2 and stride 2 it is exactly option A of `zoo.resnet` (pad out/4 on each side).
    """

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.stride, self.in_planes, self.planes = stride, in_planes, planes
        extra = max(0, planes - in_planes)
        self.pad = (extra // 2, extra - extra // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.planes < self.in_planes:
            return x[:, : self.planes]
        if self.planes > self.in_planes:
            return F.pad(x, (0, 0, 0, 0, self.pad[0], self.pad[1]), "constant", 0.0)
        return x


class _Block(BasicBlock):
    """`zoo.resnet.BasicBlock` with a shortcut between any two widths."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__(in_planes, planes, stride)
        if stride != 1 or in_planes != planes:
            self.shortcut = _ChannelShortcut(in_planes, planes, stride)


class CifarResNetShape(nn.Module):
    """A CIFAR ResNet with per-stage widths and block counts; names as in `zoo.resnet.CifarResNet`."""

    def __init__(self, widths: tuple[int, int, int], depths: tuple[int, int, int], num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        for s, (w, d) in enumerate(zip(widths, depths)):
            blocks = []
            for i in range(d):
                blocks.append(_Block(in_planes, w, 2 if (s > 0 and i == 0) else 1))
                in_planes = w
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def _resnet(arch: Arch, num_classes: int) -> nn.Module:
    widths = (_ch(16, arch["width1"]), _ch(32, arch["width2"]), _ch(64, arch["width3"]))
    depths = (int(arch["depth1"]), int(arch["depth2"]), int(arch["depth3"]))
    return CifarResNetShape(widths, depths, num_classes)


# --- registry -----------------------------------------------------------------------------------------------

FAMILIES: dict[str, Family] = {}
WIDTHS = (0.25, 0.5, 0.75, 1.0)


def register_family(family: Family, replace: bool = False) -> Family:
    get_model_spec(family.name)  # the base must be a zoo model
    if family.name in FAMILIES and not replace:
        raise ValueError(f"family {family.name!r} is already registered")
    FAMILIES[family.name] = family
    return family


def get_family(ref: str) -> Family:
    """The family of zoo model `ref` ("zoo:NAME" or "NAME"); an error lists the reshapeable models."""
    name = str(ref).strip()
    name = name[len(ZOO_PREFIX):] if name.startswith(ZOO_PREFIX) else name
    fam = FAMILIES.get(name)
    if fam is None:
        known = ", ".join(ZOO_PREFIX + n for n in FAMILIES)
        raise BitsearchError(
            f"architecture search cannot reshape {ref!r}: only zoo models of a known family can be "
            f"rebuilt at another width or depth ({known})"
        )
    return fam


register_family(Family(
    "digits-cnn",
    {"width1": WIDTHS, "width2": WIDTHS, "width3": WIDTHS, "depth3": (1, 2)},
    {"width1": 1.0, "width2": 1.0, "width3": 1.0, "depth3": 1},
    _digits_cnn,
    "per-stage width multiplier of 16/32/32 channels; 1-2 convs in the last stage",
))
register_family(Family(
    "digits-mlp",
    {"width": (0.125, 0.25, 0.5, 0.75, 1.0), "depth": (1, 2, 3)},
    {"width": 1.0, "depth": 2},
    _digits_mlp,
    "hidden width multiplier of 128/64/64; 1-3 hidden layers",
))
for _n, _depth in ((3, 20), (5, 32), (7, 44), (9, 56)):
    _blocks = tuple(range(1, _n + 1))
    register_family(Family(
        f"cifar-resnet{_depth}",
        {"width1": WIDTHS, "width2": WIDTHS, "width3": WIDTHS,
         "depth1": _blocks, "depth2": _blocks, "depth3": _blocks},
        {"width1": 1.0, "width2": 1.0, "width3": 1.0, "depth1": _n, "depth2": _n, "depth3": _n},
        _resnet,
        f"per-stage width multiplier of 16/32/64 channels; 1-{_n} blocks per stage",
    ))
del _n, _depth, _blocks


# --- weight inheritance -------------------------------------------------------------------------------------


@dataclass
class Inherited:
    """What `inherit_weights` copied: tensors (and their elements) inherited, and those left as initialised."""

    tensors: int = 0
    elements: int = 0
    fresh_tensors: int = 0
    fresh_elements: int = 0

    @property
    def fraction(self) -> float:
        """Share of the new model's parameter elements that came from the pretrained weights."""
        total = self.elements + self.fresh_elements
        return self.elements / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"tensors": self.tensors, "fresh_tensors": self.fresh_tensors, "fraction": round(self.fraction, 6)}


def inherit_weights(model: nn.Module, pretrained: Mapping[str, torch.Tensor]) -> Inherited:
    """Copy into `model`, for every same-named tensor no larger in any dimension, the pretrained leading slice.

    BatchNorm running statistics and counters are copied the same way; a tensor the new shape makes larger
    (or of another rank) keeps its initialisation and is counted as fresh.
    """
    out = Inherited()
    state = model.state_dict()
    with torch.no_grad():
        for k, t in state.items():
            src = pretrained.get(k)
            floating = t.is_floating_point()
            ok = src is not None and src.dim() == t.dim() and all(a <= b for a, b in zip(t.shape, src.shape))
            if ok:
                assert src is not None
                t.copy_(src[tuple(slice(0, n) for n in t.shape)].to(t.dtype))
                if floating:
                    out.tensors += 1
                    out.elements += t.numel()
            elif floating:
                out.fresh_tensors += 1
                out.fresh_elements += t.numel()
    model.load_state_dict(state)
    return out


def weight_count(model: nn.Module) -> int:
    """Parameters of the conv/linear weights (what bit allocation applies to)."""
    return int(sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))))


def space_size(space: Mapping[str, tuple[Any, ...]]) -> int:
    return math.prod(len(v) for v in space.values())


__all__ = [
    "FAMILIES",
    "Arch",
    "CifarResNetShape",
    "DigitsCNNShape",
    "DigitsMLPShape",
    "Family",
    "Inherited",
    "get_family",
    "inherit_weights",
    "register_family",
    "space_size",
    "weight_count",
]
