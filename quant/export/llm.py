"""Deployable outputs of an allocation for the LLM ecosystem: llama.cpp, llm-compressor, Hugging Face.

    exp = llama_cpp_tensor_types(allocation, layers)      # llama-quantize --tensor-type NAME=TYPE ...
    cfg = compressed_tensors_config(allocation)           # a compressed-tensors QuantizationConfig dict
    yaml_text = llmcompressor_recipe(allocation)          # an llm-compressor recipe with config_groups
    hf = hf_quantization_config(allocation)               # config.json's "quantization_config"

Every layer's option is mapped by its scheme name (`LayerBits.scheme_name`: a legacy integer option is
"int<b>", one scale per output channel, symmetric). Where the target has no exact equivalent the nearest
type is chosen and a note says so: a user never gets a silently different format.

Validation uses the formats' own parsers, which are pip-installable without another torch: `gguf` (the
GGML type names and block sizes, and the Hugging Face → GGUF tensor-name map llama.cpp's converter uses) and
`compressed-tensors` (its pydantic `QuantizationConfig` / `QuantizationScheme`); `transformers`' own
`CompressedTensorsConfig` reads the Hugging Face form back. llm-compressor itself is not imported: its
recipe's `config_groups` are exactly compressed-tensors `QuantizationScheme`s, which are validated.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from ..allocation import Allocation, LayerBits, is_float_bits
from ..errors import BitsearchError
from ..layers import LayerInfo


def _need(module: str, extra: str = "llm"):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise BitsearchError(
            f"this export needs the '{module}' package: pip install 'bitsearch[{extra}]'"
        ) from None


# --- llama.cpp ---------------------------------------------------------------------------------------------

#: scheme -> (GGML type, exact?, note). Integer schemes not listed fall back on `_INT_KQUANT` by bit-width.
_GGUF_EXACT: dict[str, tuple[str, bool, str]] = {
    "int8-g32": ("Q8_0", True, "Q8_0 is int8 with one fp16 scale per 32, symmetric ±127"),
    "int4-g32": ("Q4_0", False, "Q4_0: fp16 scale per 32 on the grid [-8, 7] (bitsearch uses [-7, 7])"),
    "int4-g32-asym": ("Q4_1", False, "Q4_1: fp16 scale and fp16 minimum per 32 (a float, not integer, zero point)"),
    "int5-g32": ("Q5_0", False, "Q5_0: fp16 scale per 32 on the grid [-16, 15]"),
    "int5-g32-asym": ("Q5_1", False, "Q5_1: fp16 scale and fp16 minimum per 32"),
    "mxfp4": ("MXFP4", True, "same layout: E2M1 elements, an E8M0 scale per 32"),
    "nvfp4": ("NVFP4", False, "E2M1 with an E4M3 scale per 16; GGUF's NVFP4 has no separate fp32 tensor scale"),
    "fp16": ("F16", True, ""),
    "fp32": ("F32", True, ""),
    "ternary": ("TQ2_0", False, "TQ2_0: ternary with one scale per 256, not per output channel"),
    "binary": ("Q1_0", False, "Q1_0: 1-bit with an fp16 scale per 128, not per output channel"),
    "mxfp8": ("Q8_0", False, "GGUF has no MXFP8 type; Q8_0 (int8, fp16 scale per 32) is the nearest"),
    "fp8-e4m3": ("Q8_0", False, "GGUF has no FP8 type; Q8_0 (int8, fp16 scale per 32) is the nearest"),
    "fp8-e4m3-tensor": ("Q8_0", False, "GGUF has no FP8 type; Q8_0 (int8, fp16 scale per 32) is the nearest"),
}
_INT_KQUANT = {2: "Q2_K", 3: "Q3_K", 4: "Q4_K", 5: "Q5_K", 6: "Q6_K", 7: "Q8_0", 8: "Q8_0"}
#: llama-quantize's own fallback when a row length is not a multiple of the type's block (llama-quant.cpp).
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "IQ4_NL", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
             "TQ2_0": "Q4_0", "TQ1_0": "Q4_0", "NVFP4": "Q4_0", "Q1_0": "Q4_0"}


@dataclass
class GGUFTensorType:
    layer: str
    tensor: str  # the GGUF tensor name (or the layer name when the model is not a llama.cpp architecture)
    scheme: str
    ggml_type: str
    bpw: float  # of the GGML type, from gguf's block sizes
    exact: bool
    note: str = ""


@dataclass
class LlamaCppExport:
    """`llama-quantize` arguments: one `--tensor-type PATTERN=type` per layer, and a default type."""

    tensors: list[GGUFTensorType]
    default_type: str
    notes: list[str] = field(default_factory=list)

    def args(self) -> list[str]:
        out: list[str] = []
        for t in self.tensors:
            out += ["--tensor-type", f"{_tensor_pattern(t.tensor)}={t.ggml_type.lower()}"]
        return out

    def command(self, model_in: str = "model-f16.gguf", model_out: str = "model-mixed.gguf") -> str:
        argv = ["llama-quantize", *self.args(), model_in, model_out, self.default_type.lower()]
        return " ".join(shlex.quote(a) for a in argv)

    def to_dict(self) -> dict[str, Any]:
        return {"default_type": self.default_type, "args": self.args(), "notes": self.notes,
                "tensors": [asdict(t) for t in self.tensors]}


def _tensor_pattern(name: str) -> str:
    """A regex that matches exactly this tensor name (llama-quantize matches --tensor-type by regex search)."""
    return "^" + re.escape(name).replace("\\_", "_") + "$"


def _n_blocks(names: Sequence[str]) -> int:
    idx = [int(m.group(1)) for n in names for m in [re.search(r"\.(?:layers|h|blocks)\.(\d+)\.", n)] if m]
    return max(idx) + 1 if idx else 1


def _gguf_type_for(scheme: str, bits: LayerBits) -> tuple[str, bool, str]:
    if scheme in _GGUF_EXACT:
        return _GGUF_EXACT[scheme]
    fmt = bits.format
    b = bits.weight_bits
    if b in _INT_KQUANT and (fmt is None or fmt.family == "int"):
        t = _INT_KQUANT[b]
        what = "k-quant" if t.endswith("_K") else "type"
        return t, False, f"nearest {what} for {scheme}: super-blocks of 256 with 6-bit sub-scales per 16/32"
    raise BitsearchError(f"no GGUF type for scheme {scheme!r}")


def llama_cpp_tensor_types(
    allocation: Allocation,
    layers: Sequence[LayerInfo] | None = None,
    arch: str = "llama",
) -> LlamaCppExport:
    """The nearest GGML type per tensor, as `llama-quantize --tensor-type` arguments.

    Layer names are mapped to GGUF tensor names with gguf's own Hugging Face name map for `arch` (the one
    llama.cpp's converter uses); a layer the map does not know keeps its name and gets a note. With
    `layers` (for the row lengths), a type whose block does not divide a row is replaced by the type
    llama-quantize itself would fall back to, with a note.
    """
    gguf = _need("gguf")
    try:
        arch_id = gguf.MODEL_ARCH[arch.upper().replace("-", "_")]
    except KeyError:
        raise BitsearchError(f"unknown llama.cpp architecture {arch!r}") from None
    names = list(allocation.layers)
    tmap = gguf.get_tensor_name_map(arch_id, _n_blocks(names))
    info = {layer.name: layer for layer in layers or []}
    tensors: list[GGUFTensorType] = []
    notes: list[str] = []
    for name, bits in allocation.layers.items():
        if not is_float_bits(bits.activation_bits):
            notes.append(f"{name}: activations at {bits.activation_bits} bits have no llama.cpp setting (GGUF quantizes weights)")
        scheme = bits.scheme_name
        gtype, exact, note = _gguf_type_for(scheme, bits)
        tensor = tmap.get_name(name + ".weight", try_suffixes=(".weight",))
        if tensor is None:
            tensor = name + ".weight"
            note = (note + "; " if note else "") + f"no GGUF tensor name for {name!r} in arch {arch!r}"
        layer = info.get(name)
        if layer is not None and layer.weight_shape:
            cols = layer.params // max(1, layer.weight_shape[0])
            block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[gtype]][0]
            if cols % block:
                fb = _FALLBACK.get(gtype, "F16")
                note = (note + "; " if note else "") + f"rows of {cols} are not a multiple of {gtype}'s block {block}: {fb}"
                gtype, exact = fb, False
        qtype = gguf.GGMLQuantizationType[gtype]  # validates the name against gguf's table
        block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
        tensors.append(GGUFTensorType(name, tensor, scheme, qtype.name, nbytes * 8 / block, exact, note))
    counts: dict[str, int] = {}
    for t in tensors:
        counts[t.ggml_type] = counts.get(t.ggml_type, 0) + 1
    default = max(counts, key=lambda k: counts[k])
    return LlamaCppExport(tensors, default, notes)


# --- compressed-tensors / llm-compressor / Hugging Face ------------------------------------------------------


def _weight_args(scheme: str, bits: LayerBits) -> tuple[dict[str, Any] | None, str]:
    """compressed-tensors QuantizationArgs (as a dict) for a weight scheme, and a note when not exact."""
    fmt = bits.format
    if scheme in ("fp16", "fp32"):
        return None, ""
    if scheme == "binary":
        raise BitsearchError("binary weights have no compressed-tensors form; give those layers another option")
    if scheme == "ternary":
        return ({"num_bits": 2, "type": "int", "symmetric": True, "strategy": "channel"},
                "ternary exported as int2 per channel: TWN's threshold-derived scale is not kept")
    if fmt is None or fmt.family == "int":
        if fmt is None:
            b, g, sym = bits.weight_bits, None, True
        else:
            b, g, sym = fmt.config.bits, fmt.config.group_size, fmt.config.symmetric
        args: dict[str, Any] = {"num_bits": b, "type": "int", "symmetric": sym,
                                "strategy": "group" if g else "channel"}
        if g:
            args["group_size"] = g
        return args, ""
    if fmt.family == "fp8":
        strat = "channel" if fmt.config.granularity == "per_channel" else "tensor"
        return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strat}, ""
    if fmt.family == "mx":
        from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

        preset = {"fp4": "MXFP4A16", "fp8": "MXFP8A16"}[fmt.config.element]
        return PRESET_SCHEMES[preset]["weights"].model_dump(mode="json", exclude_none=True), ""
    if fmt.family == "nvfp4":
        from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

        return PRESET_SCHEMES["NVFP4A16"]["weights"].model_dump(mode="json", exclude_none=True), ""
    raise BitsearchError(f"no compressed-tensors form for scheme {scheme!r}")


def _activation_args(bits: LayerBits) -> dict[str, Any] | None:
    if is_float_bits(bits.activation_bits):
        return None
    # bitsearch calibrates one static, asymmetric (or unsigned) range per layer input
    return {"num_bits": bits.activation_bits, "type": "int", "symmetric": False, "strategy": "tensor",
            "dynamic": False}


def _groups(allocation: Allocation) -> tuple[dict[str, dict[str, Any]], list[str], list[str]]:
    """config_groups (one per distinct option), the float layers to ignore, and notes."""
    groups: dict[tuple, dict[str, Any]] = {}
    ignore: list[str] = []
    notes: list[str] = []
    for name, bits in allocation.layers.items():
        scheme = bits.scheme_name
        w, note = _weight_args(scheme, bits)
        a = _activation_args(bits)
        if note:
            notes.append(f"{name}: {note}")
        if w is None and a is None:
            ignore.append(name)
            continue
        key = (json.dumps(w, sort_keys=True), json.dumps(a, sort_keys=True))
        g = groups.setdefault(key, {"targets": [], "weights": w, "input_activations": a})
        g["targets"].append(name)
    out = {f"group_{i}": g for i, g in enumerate(groups.values())}
    return out, ignore, notes


def compressed_tensors_config(allocation: Allocation) -> dict[str, Any]:
    """A compressed-tensors `QuantizationConfig` (validated by its pydantic model), as plain JSON data.

    Targets are the layers' module names (compressed-tensors matches a target against the module name
    exactly); float layers go to `ignore`.
    """
    ct = _need("compressed_tensors.quantization")
    groups, ignore, notes = _groups(allocation)
    if not groups:
        raise BitsearchError("the allocation quantizes no layer: there is nothing to export")
    try:
        cfg = ct.QuantizationConfig(
            config_groups={k: ct.QuantizationScheme(**v) for k, v in groups.items()},
            ignore=ignore,
            format=_ct_format(groups),
            quantization_status="compressed",
        )
    except Exception as exc:  # pydantic.ValidationError: the schema itself refused the config
        raise BitsearchError(f"compressed-tensors refused the exported config: {exc}") from None
    d = cfg.model_dump(mode="json", exclude_none=True)
    if notes:
        d.setdefault("bitsearch_notes", notes)  # extra keys are ignored by compressed-tensors readers
    return d


def _ct_format(groups: dict[str, dict[str, Any]]) -> str:
    types = {(g["weights"] or {}).get("type") for g in groups.values()}
    if types <= {"int"}:
        return "pack-quantized"
    if types <= {"float"} and all((g["weights"] or {}).get("num_bits") == 4 for g in groups.values()):
        return "nvfp4-pack-quantized"
    return "mixed-precision"


def llmcompressor_recipe(allocation: Allocation) -> str:
    """An llm-compressor recipe (YAML): one QuantizationModifier with this allocation's config_groups."""
    yaml = _need("yaml")
    cfg = compressed_tensors_config(allocation)
    modifier: dict[str, Any] = {"ignore": cfg.get("ignore", []), "config_groups": cfg["config_groups"]}
    recipe = {"quant_stage": {"quant_modifiers": {"QuantizationModifier": modifier}}}
    return yaml.safe_dump(recipe, sort_keys=False)


def parse_llmcompressor_recipe(text: str) -> dict[str, Any]:
    """Read a recipe written by `llmcompressor_recipe` back, validating each group with compressed-tensors."""
    yaml = _need("yaml")
    ct = _need("compressed_tensors.quantization")
    data = yaml.safe_load(text)
    try:
        mod = data["quant_stage"]["quant_modifiers"]["QuantizationModifier"]
        groups = {k: ct.QuantizationScheme.model_validate(v) for k, v in mod["config_groups"].items()}
    except (KeyError, TypeError) as exc:
        raise BitsearchError(f"not an llm-compressor quantization recipe: missing {exc}") from None
    return {"ignore": list(mod.get("ignore") or []), "config_groups": groups}


def hf_quantization_config(allocation: Allocation) -> dict[str, Any]:
    """The `quantization_config` of a Hugging Face config.json for this allocation (compressed-tensors)."""
    return compressed_tensors_config(allocation)


def allocation_from_compressed_tensors(config: dict[str, Any], layer_names: Sequence[str]) -> dict[str, str]:
    """Each layer's weight scheme as a compressed-tensors config assigns it (for checking an export)."""
    ct = _need("compressed_tensors.quantization")
    cfg = ct.QuantizationConfig.model_validate({k: v for k, v in config.items() if k != "bitsearch_notes"})
    out: dict[str, str] = {}
    for name in layer_names:
        if name in (cfg.ignore or []):
            out[name] = "float"
            continue
        for g in cfg.config_groups.values():
            if name in g.targets:
                w = g.weights
                if w is None:
                    out[name] = "float"
                elif w.type == "int":
                    gs = f"-g{w.group_size}" if w.strategy == "group" else ""
                    out[name] = f"int{w.num_bits}{gs}{'' if w.symmetric else '-asym'}"
                elif w.num_bits == 8 and w.strategy in ("channel", "tensor"):
                    out[name] = "fp8-e4m3" + ("" if w.strategy == "channel" else "-tensor")
                elif w.strategy == "tensor_group" and w.group_size == 16:
                    out[name] = "nvfp4"
                elif w.strategy == "group" and w.group_size == 32:
                    out[name] = f"mxfp{w.num_bits}"
                else:
                    out[name] = f"{w.type}{w.num_bits}-{w.strategy}"
                break
        else:
            out[name] = "unassigned"
    return out
