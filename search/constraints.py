"""Constraints of an allocation problem beyond its budgets: pins, ties and allowed options per layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from quant.allocation import LayerBits
from quant.errors import BitsearchError

# --- constraints ------------------------------------------------------------------------------------------


def _bits(b: "LayerBits | str | Mapping[str, Any]", where: str) -> LayerBits:
    if isinstance(b, LayerBits):
        return b
    if isinstance(b, Mapping):
        return LayerBits.from_dict(b, where=where)
    try:
        return LayerBits.parse(str(b))
    except BitsearchError as exc:
        raise BitsearchError(f"{where}: {exc}") from None


@dataclass
class Constraints:
    """What the search may not change, beyond the budgets.

    pinned:    layer -> the option it must take (`{"conv1": LayerBits(8, 8)}` or `{"conv1": "8/8"}`).
    pin_first / pin_last: pin the first / last layer in execution order (the table's order); see
               `Constraints.keep_first_last`, the usual "first and last layer at 8 bits" convention.
    ties:      groups of layers that must take the same option (e.g. layers that share an input quantizer).
    allowed:   layer -> the options it may take (a subset of the table's options).
    options:   the options every layer may take (None: all of the table's).

    A pinned option need not be one of the table's columns: it is added for that layer (its sensitivity is
    the table's value at the same weight bits when the table does not cover activations, else 0 — it is a
    constant and does not change which allocation is best).
    """

    pinned: dict[str, LayerBits] = field(default_factory=dict)
    ties: list[tuple[str, ...]] = field(default_factory=list)
    allowed: dict[str, list[LayerBits]] = field(default_factory=dict)
    options: list[LayerBits] | None = None
    pin_first: LayerBits | None = None
    pin_last: LayerBits | None = None

    def __post_init__(self) -> None:
        self.pinned = {str(n): _bits(b, f"pinned layer {n!r}") for n, b in dict(self.pinned).items()}
        self.ties = [tuple(str(n) for n in group) for group in self.ties]
        for group in self.ties:
            if len(group) < 1:
                raise BitsearchError("a tie group needs at least one layer")
        self.allowed = {
            str(n): [_bits(b, f"allowed options of {n!r}") for b in opts]
            for n, opts in dict(self.allowed).items()
        }
        for n, opts in self.allowed.items():
            if not opts:
                raise BitsearchError(f"layer {n!r} has an empty list of allowed options")
        if self.options is not None:
            self.options = [_bits(b, "allowed options") for b in self.options]
            if not self.options:
                raise BitsearchError("the list of allowed options is empty")
        if self.pin_first is not None:
            self.pin_first = _bits(self.pin_first, "pin_first")
        if self.pin_last is not None:
            self.pin_last = _bits(self.pin_last, "pin_last")

    @classmethod
    def keep_first_last(cls, bits: LayerBits | str = LayerBits(8, 8), **kwargs: Any) -> "Constraints":
        """Pin the first and the last layer at `bits` (W8A8 by default), as most papers do."""
        b = _bits(bits, "first/last bits")
        return cls(pin_first=b, pin_last=b, **kwargs)

    def resolve_pins(self, layer_names: Sequence[str]) -> dict[str, LayerBits]:
        """Every pin by layer name, with pin_first/pin_last resolved; conflicting pins are an error."""
        pins = dict(self.pinned)
        for name, b, what in (
            (layer_names[0], self.pin_first, "pin_first"),
            (layer_names[-1], self.pin_last, "pin_last"),
        ):
            if b is None:
                continue
            if name in pins and pins[name] != b:
                raise BitsearchError(
                    f"layer {name!r} is pinned to {pins[name].label()} and, by {what}, to {b.label()}"
                )
            pins[name] = b
        return pins

    def to_dict(self) -> dict[str, Any]:
        return {
            "pinned": {n: b.to_dict() for n, b in self.pinned.items()},
            "ties": [list(g) for g in self.ties],
            "allowed": {n: [b.to_dict() for b in opts] for n, opts in self.allowed.items()},
            "options": None if self.options is None else [b.to_dict() for b in self.options],
            "pin_first": None if self.pin_first is None else self.pin_first.to_dict(),
            "pin_last": None if self.pin_last is None else self.pin_last.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "Constraints":
        d = dict(d or {})
        unknown = set(d) - {"pinned", "ties", "allowed", "options", "pin_first", "pin_last"}
        if unknown:
            raise BitsearchError(f"constraints: unknown field(s) {sorted(unknown)}")
        return cls(
            pinned=d.get("pinned") or {},
            ties=d.get("ties") or [],
            allowed=d.get("allowed") or {},
            options=d.get("options"),
            pin_first=d.get("pin_first"),
            pin_last=d.get("pin_last"),
        )


