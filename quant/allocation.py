"""`Allocation`: the chosen bit-widths of every quantizable layer, and its versioned JSON form.

The JSON schema is documented in docs/allocation-schema.md; `SCHEMA_VERSION` changes whenever a reader of
the old form would misread the new one, and `Allocation.from_json` accepts every version it knows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from .errors import BitsearchError
from .jsonfile import JsonFile

SCHEMA_NAME = "bitsearch.allocation"
SCHEMA_VERSION = 1

#: Bit-widths a layer may take. 16 and 32 mean "leave in floating point"; 1 is binary weights.
INTEGER_BITS = tuple(range(1, 9))
FLOAT_BITS = (16, 32)
VALID_BITS = INTEGER_BITS + FLOAT_BITS

#: Weight quantizers an allocation may name per layer (None: the config's default for the bit-width).
WEIGHT_QUANTIZERS = ("int", "ternary", "binary")


def is_float_bits(bits: int) -> bool:
    return bits >= 16


def check_bits(bits: Any, what: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in VALID_BITS:
        raise BitsearchError(f"{what} must be one of {list(VALID_BITS)} (16/32 = float), got {bits!r}")
    return bits


@dataclass(frozen=True)
class LayerBits:
    """The bit option of one layer: weight bits and input-activation bits.

    Options sort by (weight_bits, activation_bits, weight_quantizer), with no quantizer override first; the
    ordering is written out by hand because the dataclass one compares None with a string and fails.
    """

    weight_bits: int
    activation_bits: int = 32
    weight_quantizer: str | None = None  # "ternary" (2-bit slot) or "binary" (1-bit) override

    def __post_init__(self) -> None:
        check_bits(self.weight_bits, "weight_bits")
        check_bits(self.activation_bits, "activation_bits")
        if self.activation_bits == 1:
            raise BitsearchError("activation_bits must be at least 2 (or 16/32 for float)")
        if self.weight_quantizer is not None and self.weight_quantizer not in WEIGHT_QUANTIZERS:
            raise BitsearchError(
                f"weight_quantizer must be one of {list(WEIGHT_QUANTIZERS)}, got {self.weight_quantizer!r}"
            )
        if self.weight_quantizer is not None and is_float_bits(self.weight_bits):
            raise BitsearchError(
                f"weight_quantizer {self.weight_quantizer!r} needs integer weight_bits, "
                f"got {self.weight_bits} (float)"
            )
        if self.weight_quantizer == "ternary" and self.weight_bits != 2:
            raise BitsearchError("a ternary layer takes weight_bits 2 (its storage per weight)")
        if self.weight_quantizer == "binary" and self.weight_bits != 1:
            raise BitsearchError("a binary layer takes weight_bits 1")

    def _sort_key(self) -> tuple[int, int, str]:
        return (self.weight_bits, self.activation_bits, self.weight_quantizer or "")

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, LayerBits):
            return NotImplemented
        return self._sort_key() < other._sort_key()

    def __le__(self, other: object) -> bool:
        if not isinstance(other, LayerBits):
            return NotImplemented
        return self._sort_key() <= other._sort_key()

    def __gt__(self, other: object) -> bool:
        if not isinstance(other, LayerBits):
            return NotImplemented
        return self._sort_key() > other._sort_key()

    def __ge__(self, other: object) -> bool:
        if not isinstance(other, LayerBits):
            return NotImplemented
        return self._sort_key() >= other._sort_key()

    @classmethod
    def parse(cls, text: str) -> "LayerBits":
        """'4/8' -> W4A8, '4' -> weight-only W4 (activations float), 'fp' or '32' -> float."""
        parts = [p.strip().lower() for p in str(text).split("/")]
        if len(parts) > 2 or not all(parts):
            raise BitsearchError(f"bits must look like W or W/A (e.g. 4/8), got {text!r}")

        def num(p: str) -> int:
            if p in ("fp", "fp32", "float"):
                return 32
            if p == "fp16":
                return 16
            try:
                return int(p)
            except ValueError:
                raise BitsearchError(f"bits must look like W or W/A (e.g. 4/8), got {text!r}") from None

        w = num(parts[0])
        a = num(parts[1]) if len(parts) == 2 else 32
        return cls(w, a)

    def label(self) -> str:
        w = "fp" if is_float_bits(self.weight_bits) else str(self.weight_bits)
        if self.weight_quantizer == "ternary":
            w = "t"
        a = "fp" if is_float_bits(self.activation_bits) else str(self.activation_bits)
        return f"W{w}A{a}"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"weight_bits": self.weight_bits, "activation_bits": self.activation_bits}
        if self.weight_quantizer:
            d["weight_quantizer"] = self.weight_quantizer
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "layer") -> "LayerBits":
        if not isinstance(d, Mapping):
            raise BitsearchError(f"{where}: expected an object with weight_bits, got {type(d).__name__}")
        unknown = set(d) - {"weight_bits", "activation_bits", "weight_quantizer"}
        if unknown:
            raise BitsearchError(f"{where}: unknown field(s) {sorted(unknown)}")
        if "weight_bits" not in d:
            raise BitsearchError(f"{where}: weight_bits is required")
        try:
            return cls(d["weight_bits"], d.get("activation_bits", 32), d.get("weight_quantizer"))
        except BitsearchError as exc:
            raise BitsearchError(f"{where}: {exc}") from None


@dataclass
class Allocation(JsonFile):
    """Per-layer bit options, keyed by the layer names of `quant.layers.discover_layers`."""

    json_what = "allocation"

    layers: dict[str, LayerBits]
    model: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def uniform(
        cls, layer_names: Iterable[str], bits: LayerBits | str, model: str | None = None
    ) -> "Allocation":
        b = LayerBits.parse(bits) if isinstance(bits, str) else bits
        return cls({n: b for n in layer_names}, model=model, metadata={"uniform": b.label()})

    def __getitem__(self, name: str) -> LayerBits:
        return self.layers[name]

    def __len__(self) -> int:
        return len(self.layers)

    def check_layers(self, layer_names: Iterable[str]) -> None:
        """Raise if the allocation does not name exactly the given layers."""
        names = list(layer_names)
        known = set(names)
        missing = [n for n in names if n not in self.layers]
        extra = [n for n in self.layers if n not in known]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing layer(s) {missing[:5]}{' …' if len(missing) > 5 else ''}")
            if extra:
                parts.append(f"unknown layer(s) {extra[:5]}{' …' if len(extra) > 5 else ''}")
            raise BitsearchError("the allocation does not fit the model: " + "; ".join(parts))

    # --- JSON -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_NAME,
            "version": SCHEMA_VERSION,
            "model": self.model,
            "layers": {n: b.to_dict() for n, b in self.layers.items()},
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, d: Any) -> "Allocation":
        if not isinstance(d, Mapping):
            raise BitsearchError("an allocation must be a JSON object")
        if d.get("schema") != SCHEMA_NAME:
            raise BitsearchError(
                f"not an allocation: 'schema' must be {SCHEMA_NAME!r}, got {d.get('schema')!r}"
            )
        version = d.get("version")
        # `type() is int`: JSON true and 1.0 compare equal to 1 in Python but are not a schema version.
        if type(version) is not int or version != SCHEMA_VERSION:
            raise BitsearchError(
                f"allocation schema version {version!r} is not supported "
                f"(this bitsearch reads {SCHEMA_VERSION})"
            )
        layers = d.get("layers")
        if not isinstance(layers, Mapping) or not layers:
            raise BitsearchError("an allocation needs a non-empty 'layers' object")
        meta = d.get("metadata")
        if meta is None:
            meta = {}
        if not isinstance(meta, Mapping):
            raise BitsearchError("'metadata' must be an object")
        model = d.get("model")
        if model is not None and not isinstance(model, str):
            raise BitsearchError("'model' must be a string or null")
        return cls(
            {str(n): LayerBits.from_dict(b, where=f"layer {n!r}") for n, b in layers.items()},
            model=model,
            metadata=dict(meta),
        )
