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
SCHEMA_VERSION = 2
#: Versions `Allocation.from_dict` reads: 1 (no `scheme` field) and 2 (a layer may name its weight scheme).
READ_VERSIONS = (1, 2)

#: Bit-widths a layer may take. 16 and 32 mean "leave in floating point"; 1 is binary weights.
INTEGER_BITS = tuple(range(1, 9))
FLOAT_BITS = (16, 32)
VALID_BITS = INTEGER_BITS + FLOAT_BITS

#: Weight quantizers an allocation may name per layer (None: the config's default for the bit-width).
WEIGHT_QUANTIZERS = ("int", "ternary", "binary")

from .formats import WeightFormat, parse_scheme  # noqa: E402


def is_float_bits(bits: int) -> bool:
    return bits >= 16


def check_bits(bits: Any, what: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in VALID_BITS:
        raise BitsearchError(f"{what} must be one of {list(VALID_BITS)} (16/32 = float), got {bits!r}")
    return bits


@dataclass(frozen=True)
class LayerBits:
    """The bit option of one layer: weight bits (or a named weight scheme) and input-activation bits.

    `scheme` names a weight format of `quant.formats` ("int4-g128", "mxfp4", "nvfp4", "fp8-e4m3", ...);
    `weight_bits` is then the scheme's element width. Without a scheme the option means what it meant in
    schema version 1: integer weights realised by the `QuantConfig` (per channel, symmetric by default),
    ternary/binary by `weight_quantizer`, float at 16/32. The legacy scheme names ("ternary", "binary",
    "fp16", "fp32") are stored in that form, so each option has one spelling and compares equal to it.

    Options sort by (weight_bits, activation_bits, weight_quantizer, scheme), the legacy option first; the
    ordering is written out by hand because the dataclass one compares None with a string and fails.
    """

    weight_bits: int
    activation_bits: int = 32
    weight_quantizer: str | None = None  # "ternary" (2-bit slot) or "binary" (1-bit) override
    scheme: str | None = None  # a `quant.formats` scheme name; None: the QuantConfig's integer quantizer

    def __post_init__(self) -> None:
        if self.scheme is not None:
            self._normalise_scheme()
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

    def _normalise_scheme(self) -> None:
        fmt = parse_scheme(self.scheme)  # type: ignore[arg-type]
        if self.weight_quantizer not in (None, "int") or (
            self.weight_quantizer == "int" and fmt.family != "int"
        ):
            raise BitsearchError(
                f"scheme {fmt.name!r} and weight_quantizer {self.weight_quantizer!r} cannot both be given"
            )
        if fmt.element_bits != self.weight_bits:
            raise BitsearchError(
                f"scheme {fmt.name!r} stores {fmt.element_bits}-bit elements, but weight_bits is {self.weight_bits!r}"
            )
        if fmt.family == "legacy":
            kind = fmt.name
            object.__setattr__(self, "weight_quantizer", kind if kind in ("ternary", "binary") else None)
            object.__setattr__(self, "scheme", None)
        else:
            object.__setattr__(self, "weight_quantizer", None)
            object.__setattr__(self, "scheme", fmt.name)

    @classmethod
    def of(cls, scheme: str, activation_bits: int = 32) -> "LayerBits":
        """The option of a named scheme: `LayerBits.of("int4-g128")`, `LayerBits.of("nvfp4", 8)`."""
        return cls(parse_scheme(scheme).element_bits, activation_bits, None, scheme)

    @property
    def format(self) -> WeightFormat | None:
        """The scheme's `quant.formats` format, or None for a legacy option."""
        return parse_scheme(self.scheme) if self.scheme else None

    @property
    def scheme_name(self) -> str:
        """A scheme name for every option: the scheme, or ternary/binary/fp16/fp32, or "int<b>" (config's)."""
        if self.scheme:
            return self.scheme
        if self.weight_quantizer in ("ternary", "binary"):
            return self.weight_quantizer
        if is_float_bits(self.weight_bits):
            return f"fp{self.weight_bits}"
        if self.weight_bits == 1:
            return "binary"
        return f"int{self.weight_bits}"

    def _sort_key(self) -> tuple[int, int, str, str]:
        return (self.weight_bits, self.activation_bits, self.weight_quantizer or "", self.scheme or "")

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
        """'4/8' -> W4A8, '4' -> weight-only W4 (activations float), 'fp' or '32' -> float;
        a scheme name for the weights: 'int4-g128', 'mxfp4/8', 'nvfp4/fp16'."""
        parts = [p.strip().lower() for p in str(text).split("/")]
        if len(parts) > 2 or not all(parts):
            raise BitsearchError(f"bits must look like W or W/A (e.g. 4/8, int4-g128/8), got {text!r}")

        def num(p: str) -> int:
            if p in ("fp", "fp32", "float"):
                return 32
            if p == "fp16":
                return 16
            if p.startswith("a") and p[1:].isdigit():
                p = p[1:]  # the "A8" of a scheme label
            try:
                return int(p)
            except ValueError:
                raise BitsearchError(
                    f"bits must look like W or W/A (e.g. 4/8, int4-g128/8), got {text!r}"
                ) from None

        a = num(parts[1]) if len(parts) == 2 else 32
        w_text = parts[0]
        if w_text in ("fp", "fp32", "float", "fp16") or w_text.isdigit():
            return cls(num(w_text), a)
        try:
            fmt = parse_scheme(w_text)
        except BitsearchError as exc:
            raise BitsearchError(f"bits must look like W or W/A (e.g. 4/8, int4-g128/8), got {text!r}: {exc}") from None
        return cls(fmt.element_bits, a, None, fmt.name)

    def label(self) -> str:
        a = "fp" if is_float_bits(self.activation_bits) else str(self.activation_bits)
        if self.scheme:
            # Parses back: "int4-g128" (weight-only), "mxfp4/8".
            return self.scheme if self.activation_bits == 32 else f"{self.scheme}/{'fp16' if a == 'fp' else a}"
        w = "fp" if is_float_bits(self.weight_bits) else str(self.weight_bits)
        if self.weight_quantizer == "ternary":
            w = "t"
        return f"W{w}A{a}"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"weight_bits": self.weight_bits, "activation_bits": self.activation_bits}
        if self.weight_quantizer:
            d["weight_quantizer"] = self.weight_quantizer
        if self.scheme:
            d["scheme"] = self.scheme
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "layer", version: int = SCHEMA_VERSION) -> "LayerBits":
        if not isinstance(d, Mapping):
            raise BitsearchError(f"{where}: expected an object with weight_bits, got {type(d).__name__}")
        allowed = {"weight_bits", "activation_bits", "weight_quantizer"} | ({"scheme"} if version >= 2 else set())
        unknown = set(d) - allowed
        if unknown:
            extra = " ('scheme' needs allocation schema version 2)" if "scheme" in unknown else ""
            raise BitsearchError(f"{where}: unknown field(s) {sorted(unknown)}{extra}")
        scheme = d.get("scheme")
        if scheme is not None and not isinstance(scheme, str):
            raise BitsearchError(f"{where}: scheme must be a string, got {scheme!r}")
        if "weight_bits" not in d:
            if scheme is None:
                raise BitsearchError(f"{where}: weight_bits is required")
        try:
            if "weight_bits" not in d:
                return cls.of(scheme, d.get("activation_bits", 32))  # type: ignore[arg-type]
            return cls(d["weight_bits"], d.get("activation_bits", 32), d.get("weight_quantizer"), scheme)
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
        if type(version) is not int or version not in READ_VERSIONS:
            raise BitsearchError(
                f"allocation schema version {version!r} is not supported "
                f"(this bitsearch reads {', '.join(map(str, READ_VERSIONS))})"
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
            {str(n): LayerBits.from_dict(b, where=f"layer {n!r}", version=version) for n, b in layers.items()},
            model=model,
            metadata=dict(meta),
        )
