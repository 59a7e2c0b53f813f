"""ONNX export of a fake-quantized model as QuantizeLinear/DequantizeLinear (QDQ) pairs.

    qmodel = apply_allocation(model, allocation, calibration=batches)
    result = export_onnx(qmodel, example_input)
    result.save("model.onnx")

Every `QuantizedLayer` of `quant.apply` becomes, in the graph:

- its weight as an integer initializer (per output channel, or per tensor, as configured) followed by a
  `DequantizeLinear` that carries the very scales and zero points the fake-quant model uses, so the
  dequantized weights equal the fake-quant weights bit for bit (checked at export);
- its input activation through `QuantizeLinear` -> `DequantizeLinear` with the calibrated per-tensor scale
  and zero point (unsigned after ReLU, else affine/signed as the fake-quant quantizer is);
- float layers (16/32 bits) stay float (16 bits: float32 weights rounded to float16, activations through a
  float16 Cast pair).

Containers: 8-bit weights are int8. Weights of 4 bits or fewer go in int4 tensors at opset 21 when ONNX
Runtime here runs int4 DequantizeLinear (`int4="auto"`), else in int8 containers holding the narrower grid.
Activations are uint8 or int8 at every width (no runtime has int4-activation kernels, and ONNX Runtime 1.32's
QDQ propagation turns a uint4 activation before MaxPool into an invalid graph); an activation grid narrower
than its container is bounded by a `Clip` before its `QuantizeLinear`, so the runtime rounds onto exactly the
fake-quant grid. `ExportResult.layers` says which
container each layer got, and the allocation, containers and quantization config are embedded as model
metadata (`bitsearch.allocation`, `bitsearch.containers`, `bitsearch.quant_config`).
"""

from __future__ import annotations

import copy
import functools
import io
import json
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from torch import nn

from ..allocation import Allocation, is_float_bits
from ..apply import QuantizedLayer, _layer_forward, quantized_layers
from ..errors import BitsearchError
from ..quantizers import BinaryQuantizer, FloatQuantizer, Quantizer, TernaryQuantizer

INT4_OPSET = 21
DEFAULT_OPSET = 17  # the widest runtime support (TensorRT, ORT mobile) when no int4 tensor is needed
INPUT_NAME, OUTPUT_NAME = "input", "output"

_ONNX_INT = {"int8": 3, "uint8": 2, "int4": 22, "uint4": 21}  # onnx.TensorProto data types
_TORCH_INT = {"int8": torch.int8, "uint8": torch.uint8, "int4": torch.int8, "uint4": torch.uint8}
_RANGE = {"int8": (-128, 127), "uint8": (0, 255), "int4": (-8, 7), "uint4": (0, 15)}


def _need_onnx():
    try:
        import onnx
    except ImportError:  # pragma: no cover - depends on the installation
        raise BitsearchError("ONNX export needs the 'onnx' package: pip install 'bitsearch[export]'") from None
    return onnx


@dataclass
class ExportConfig:
    """How the QDQ graph is written.

    `int4`: "auto" puts grids of <= 4 bits in int4/uint4 tensors (opset 21) when ONNX Runtime here runs
    them, "always" does so regardless, "never" keeps every grid in an 8-bit container. `opset`: None picks
    21 when an int4 container is used, else 17. `dynamic_batch`: the batch dimension is symbolic.
    """

    int4: Literal["auto", "always", "never"] = "auto"
    opset: int | None = None
    dynamic_batch: bool = True
    #: Fold an inference BatchNorm that follows a quantized Conv into that Conv: the integer weights stay,
    #: each output channel's scale is multiplied by gamma / sqrt(var + eps) and the shift becomes the bias.
    #: The dequantized weights are then the fake-quant weights times that factor (equal up to float32
    #: rounding, no longer bit for bit), and ONNX Runtime can fuse Conv -> ReLU -> QuantizeLinear into an
    #: integer QLinearConv. Off by default.
    fold_batchnorm: bool = False

    def __post_init__(self) -> None:
        if self.int4 not in ("auto", "always", "never"):
            raise BitsearchError(f"int4 must be 'auto', 'always' or 'never', got {self.int4!r}")
        if self.opset is not None:
            if isinstance(self.opset, bool) or not isinstance(self.opset, int) or not 13 <= self.opset <= 21:
                raise BitsearchError(f"opset must be an integer in 13..21 (per-channel QDQ needs 13), got {self.opset!r}")
            if self.int4 == "always" and self.opset < INT4_OPSET:
                raise BitsearchError(f"int4 containers need opset {INT4_OPSET}, got opset {self.opset}")


@dataclass
class LayerExport:
    """What one quantizable layer became in the graph."""

    name: str
    label: str  # the allocation's label, e.g. W4A8
    weight: str  # container: int8, int4, float32, "float32 (float16 values)"
    activation: str  # container: uint8, int8, uint4, int4, float32, float16
    weight_grid: tuple[int, int] | None  # integer levels the weight uses, None when float
    activation_grid: tuple[int, int] | None
    activation_clipped: bool = False  # a Clip narrows the container to the grid

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ExportResult:
    model: Any  # onnx.ModelProto
    layers: list[LayerExport]
    opset: int
    notes: list[str] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        return self.model.SerializeToString()

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.write_bytes(self.to_bytes())
        return p

    def summary(self) -> list[str]:
        """One line per layer, for the CLI and logs."""
        lines = []
        for layer in self.layers:
            act = layer.activation + (" (clipped to the grid)" if layer.activation_clipped else "")
            lines.append(f"{layer.name}: {layer.label} -> weight {layer.weight}, activation {act}")
        return lines


# --- int4 support of the runtime ----------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def ort_supports_int4(provider: str = "CPUExecutionProvider") -> bool:
    """True when ONNX Runtime here runs int4 DequantizeLinear and uint4 Quantize/DequantizeLinear (opset 21)."""
    onnx = _need_onnx()
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    from onnx import TensorProto as T
    from onnx import helper as h

    inits = [
        h.make_tensor("w", T.INT4, [2, 3], [-7, 0, 7, 1, 2, -3]),
        h.make_tensor("wz", T.INT4, [2], [0, 0]),
        h.make_tensor("ws", T.FLOAT, [2], [0.5, 0.25]),
        h.make_tensor("s", T.FLOAT, [], [0.1]),
        h.make_tensor("z", T.UINT4, [], [0]),
    ]
    nodes = [
        h.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wf"], axis=0),
        h.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        h.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
        h.make_node("Transpose", ["wf"], ["wt"]),
        h.make_node("MatMul", ["xd", "wt"], ["y"]),
    ]
    graph = h.make_graph(
        nodes, "int4_probe", [h.make_tensor_value_info("x", T.FLOAT, [1, 3])],
        [h.make_tensor_value_info("y", T.FLOAT, [1, 2])], inits,
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", INT4_OPSET)])
    model.ir_version = 10
    try:
        sess = ort.InferenceSession(model.SerializeToString(), providers=[provider])
        (y,) = sess.run(None, {"x": np.array([[0.3, 1.0, 2.0]], np.float32)})
    except Exception:
        return False
    # x -> [3, 10, 15] · 0.1 (saturated at 15): [-1.05 + 5.25, 0.075 + 0.5 - 1.125]
    return bool(np.allclose(y, [[4.2, -0.55]], atol=1e-5))


def container_for(bits: int, signed: bool, int4: bool) -> str:
    """The integer tensor type that holds a `bits`-wide grid: int4/uint4 when allowed and wide enough."""
    if not 1 <= bits <= 8:
        raise BitsearchError(f"no integer container for {bits} bits")
    small = "int4" if signed else "uint4"
    return small if (int4 and bits <= 4) else ("int8" if signed else "uint8")


# --- graph pieces: autograd functions whose ONNX symbolic is the QDQ form of their forward -------------


class _DequantizeWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, scale, zero_point, axis: int):  # noqa: D401 - torch API
        if scale.dim() == 0:
            return (q.to(torch.float32) - zero_point.to(torch.float32)) * scale
        shape = [1] * q.dim()
        shape[axis] = -1
        return (q.to(torch.float32) - zero_point.to(torch.float32).reshape(shape)) * scale.reshape(shape)

    @staticmethod
    def symbolic(g, q, scale, zero_point, axis: int):
        if scale.type().dim() == 0:
            return g.op("DequantizeLinear", q, scale, zero_point)
        return g.op("DequantizeLinear", q, scale, zero_point, axis_i=axis)


class _QuantDequantActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin: int, qmax: int, lo: float | None, hi: float | None):
        z = zero_point.to(torch.float32)
        q = torch.clamp(torch.round(x / scale + z), qmin, qmax)  # as Quantizer.fake_quant, deterministic
        return (q - z) * scale

    @staticmethod
    def symbolic(g, x, scale, zero_point, qmin: int, qmax: int, lo: float | None, hi: float | None):
        if lo is not None:
            lo_t = g.op("Constant", value_t=torch.tensor(lo, dtype=torch.float32))
            hi_t = g.op("Constant", value_t=torch.tensor(hi, dtype=torch.float32))
            x = g.op("Clip", x, lo_t, hi_t)
        q = g.op("QuantizeLinear", x, scale, zero_point)
        return g.op("DequantizeLinear", q, scale, zero_point)


class _RoundHalf(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.to(torch.float16).to(torch.float32)

    @staticmethod
    def symbolic(g, x):
        return g.op("Cast", g.op("Cast", x, to_i=10), to_i=1)  # FLOAT16, then FLOAT


# --- the export module that replaces each QuantizedLayer ------------------------------------------------


def _weight_grid(q: QuantizedLayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Integer weights, scale (per channel or scalar), zero point and levels that reproduce the fake-quant weight."""
    wq: Quantizer = q.weight_quant
    w = q.layer.weight.detach().float()
    qi = wq.quantize(w)
    if isinstance(wq, TernaryQuantizer):
        alpha = wq.step(w)
        scale = alpha.reshape(-1) if wq.per_channel else alpha.reshape(())
        zp = torch.zeros_like(scale)
    elif isinstance(wq, BinaryQuantizer):
        scale = w.abs().mean(dim=wq.reduce_dims(w))  # XNOR-Net: α = mean |w| per output channel
        zp = torch.zeros_like(scale)
    else:
        scale, zp = wq.scale.detach().float(), wq.zero_point.detach().float()
    return qi, scale.float(), zp, wq.levels()


class _ExportLayer(nn.Module):
    """A QuantizedLayer frozen into the QDQ form; its forward equals the fake-quant layer's."""

    def __init__(self, q: QuantizedLayer, int4: bool):
        super().__init__()
        bits = q.bits
        self.name = q.name
        layer = copy.copy(q.layer)  # shallow: its conv settings, without its parameters in the graph
        layer._parameters = {}
        layer._buffers = {}
        self.op = layer
        self.axis = 0
        b = q.layer.bias.detach() if q.layer.bias is not None else None
        if q.bias_correction is not None:
            b = q.bias_correction if b is None else b + q.bias_correction
        self.register_buffer("bias", None if b is None else b.detach().clone())
        label = bits.label() if bits else "WfpAfp"

        # weight
        wq = q.weight_quant
        w_grid = None
        if bits is None or isinstance(wq, FloatQuantizer):
            wbits = 32 if bits is None else bits.weight_bits
            # 16 bits: float32 values rounded to float16, as the fake-quant weight is
            w_cont = "float32 (float16 values)" if wbits == 16 else "float32"
            w = q.layer.weight.detach().float()
            self.register_buffer("weight", w.half().float() if wbits == 16 else w.clone())
        else:
            qi, scale, zp, w_grid = _weight_grid(q)
            w_cont = container_for(max(bits.weight_bits, 1), w_grid[0] < 0, int4)  # uint for affine weights
            self.register_buffer("weight_q", qi.to(_TORCH_INT[w_cont]))
            self.register_buffer("weight_scale", scale.contiguous())
            self.register_buffer("weight_zero_point", zp.to(_TORCH_INT[w_cont]))
            self._check_weight(q, wq)
        self.w_cont = w_cont

        # input activation
        iq = q.input_quant
        a_grid, self.clip = None, None
        if bits is None or isinstance(iq, FloatQuantizer):
            abits = 32 if bits is None else bits.activation_bits
            a_cont = "float16" if abits == 16 else "float32"
        else:
            a_grid = iq.levels()
            # Activations stay in 8-bit containers: no runtime has int4-activation kernels, and ONNX Runtime
            # 1.32's QDQ propagation moves a uint4 QuantizeLinear across MaxPool into an invalid graph.
            a_cont = container_for(bits.activation_bits, a_grid[0] < 0, False)
            scale = iq.scale.detach().float().reshape(())
            zp = iq.zero_point.detach().float().reshape(())
            lo_c, hi_c = _RANGE[a_cont]
            if (lo_c, hi_c) != a_grid:
                self.clip = (
                    float(((a_grid[0] - zp) * scale).item()),
                    float(((a_grid[1] - zp) * scale).item()),
                )
            self.register_buffer("input_scale", scale.clone())
            self.register_buffer("input_zero_point", zp.to(_TORCH_INT[a_cont]))
        self.a_cont = a_cont
        self.info = LayerExport(
            name=q.name, label=label, weight=w_cont, activation=a_cont,
            weight_grid=w_grid, activation_grid=a_grid, activation_clipped=self.clip is not None,
        )

    @torch.no_grad()
    def _check_weight(self, q: QuantizedLayer, wq: Quantizer) -> None:
        """The dequantized integer weight must equal the fake-quant weight (bit for bit for integer grids)."""
        ref = wq(q.layer.weight.detach().float())
        got = self.dequantized_weight()
        exact = not isinstance(wq, BinaryQuantizer)
        # Binary's straight-through form wc + (α·sign - wc) may round α·sign by one float32 ulp.
        same = torch.equal(got, ref) if exact else torch.allclose(got, ref, rtol=2e-7, atol=0.0)
        if not same:
            raise BitsearchError(
                f"layer {q.name!r}: its integer weights do not reproduce the fake-quant weights "
                f"(max difference {(got - ref).abs().max().item():.3g}); cannot export faithfully"
            )

    def dequantized_weight(self) -> torch.Tensor:
        if hasattr(self, "weight_q"):
            return _DequantizeWeight.apply(self.weight_q, self.weight_scale, self.weight_zero_point, self.axis)
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_cont == "float16":
            x = _RoundHalf.apply(x)
        elif self.a_cont != "float32":
            lo, hi = self.clip if self.clip else (None, None)
            g = self.info.activation_grid
            x = _QuantDequantActivation.apply(x, self.input_scale, self.input_zero_point, g[0], g[1], lo, hi)
        return _layer_forward(self.op, x, self.dequantized_weight(), self.bias)


def _freeze(qmodel: nn.Module, int4: bool) -> tuple[nn.Module, dict[str, _ExportLayer]]:
    """A copy of `qmodel` whose QuantizedLayers are replaced by their QDQ export form."""
    model = copy.deepcopy(qmodel).eval()
    layers: dict[int, _ExportLayer] = {}
    for q in quantized_layers(model).values():
        layers[id(q)] = _ExportLayer(q, int4)
    for parent in list(model.modules()):
        if isinstance(parent, _ExportLayer):
            continue
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in layers:
                setattr(parent, child_name, layers[id(child)])
    return model, {e.name: e for e in layers.values()}


# --- errors: name the operator and the layer -----------------------------------------------------------

_OP_RE = re.compile(r"(aten|prim|onnx|quantized)::[A-Za-z0-9_.]+")


def _same_op(kind: str, op: str) -> bool:
    """`aten::special_i0` in a traced graph is `aten::i0` in the exporter's message."""
    if kind == op:
        return True
    k, o = kind.split("::")[-1], op.split("::")[-1]
    return k.endswith("_" + o) or o.endswith("_" + k)


def _scope_of(model: nn.Module, example: tuple, op: str) -> str | None:
    """The module path (`layer1.0.conv2`) where the traced graph runs `op`, or None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(model, example, check_trace=False, strict=False)
        graph = traced.inlined_graph
    except Exception:
        return None
    for node in graph.nodes():
        if _same_op(node.kind(), op):
            # scope names look like "__module.block/__module.block.odd": the last part is the full path
            last = node.scopeName().split("/")[-1]
            return last.removeprefix("__module.").removeprefix("__module") or "<top-level model>"
    return None


def _export_error(model: nn.Module, example: tuple, exc: Exception) -> BitsearchError:
    text = str(exc)
    m = _OP_RE.search(text)
    op = m.group(0) if m else None
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    if op:
        where = _scope_of(model, example, op)
        layer = f"layer {where!r}" if where else "an unknown layer"
        return BitsearchError(
            f"the model cannot be exported to ONNX: operator {op} in {layer} has no ONNX form here "
            f"({first})"
        )
    return BitsearchError(f"the model cannot be exported to ONNX: {type(exc).__name__}: {first}")


# --- the export -----------------------------------------------------------------------------------------


def _torch_export(model: nn.Module, example: tuple, opset: int, dynamic_batch: bool) -> bytes:
    buf = io.BytesIO()
    try:  # the exporter otherwise prints its whole IR graph on stdout when it fails
        torch._C._jit_set_onnx_log_enabled(False)
    except AttributeError:  # pragma: no cover - depends on the torch build
        pass
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, example, buf, dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], dynamic_axes=axes, do_constant_folding=True,
        )
    return buf.getvalue()


def _as_example(example_input: Any) -> tuple:
    return example_input if isinstance(example_input, tuple) else (example_input,)


def export_float(model: nn.Module, example_input: Any, opset: int = DEFAULT_OPSET, dynamic_batch: bool = True):
    """The FP32 model as ONNX (the baseline of fidelity and latency figures)."""
    onnx = _need_onnx()
    example = _as_example(example_input)
    model = copy.deepcopy(model).eval()
    try:
        data = _torch_export(model, example, opset, dynamic_batch)
    except BitsearchError:
        raise
    except Exception as exc:
        raise _export_error(model, example, exc) from exc
    return onnx.load_from_string(data)


def _inline_identities(model) -> None:
    """Replace `Identity(initializer)` nodes by a copy of the initializer under the node's output name.

    The exporter shares equal constants (all-zero zero points) between layers through Identity nodes; each
    layer gets its own tensor back, so that one layer's container can change without touching another's.
    """
    inits = {t.name: t for t in model.graph.initializer}
    keep = []
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            t = model.graph.initializer.add()
            t.CopyFrom(inits[node.input[0]])
            t.name = node.output[0]
            continue
        keep.append(node)
    if len(keep) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(keep)


def _retype(model, names: dict[str, str]) -> None:
    """Rewrite the named 8-bit initializers as int4/uint4 tensors with the same values."""
    from onnx import helper, numpy_helper

    _inline_identities(model)
    inits = {t.name: t for t in model.graph.initializer}
    for name, cont in names.items():
        t = inits.get(name)
        if t is None:
            raise BitsearchError(f"internal: initializer {name!r} was not found in the exported graph")
        arr = numpy_helper.to_array(t).astype(np.int32)
        new = helper.make_tensor(name, _ONNX_INT[cont], list(arr.shape), arr.flatten().tolist())
        t.CopyFrom(new)


def _fold_batchnorm(model) -> int:
    """Fold `DequantizeLinear(w) -> Conv -> BatchNormalization` (the Conv's only consumer) into the Conv.

    Per output channel c with factor f_c = gamma_c / sqrt(var_c + eps): scale_c' = |scale_c · f_c| and the
    integers of channel c change sign where f_c < 0 (the symmetric grid is closed under negation); the bias
    becomes beta_c + (b_c - mean_c) · f_c. Returns how many convolutions were folded.
    """
    from onnx import helper, numpy_helper

    _inline_identities(model)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in g.output}

    def arr(name):
        return numpy_helper.to_array(inits[name])

    def put(name, value):
        inits[name].CopyFrom(numpy_helper.from_array(value, name))

    removed, folded = set(), 0
    for bn in list(g.node):
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1:
            continue
        conv = producers.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or len(consumers.get(conv.output[0], [])) != 1:
            continue
        if conv.output[0] in graph_outputs or not all(i in inits for i in bn.input[1:5]):
            continue
        dq = producers.get(conv.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or len(consumers.get(dq.output[0], [])) != 1:
            continue
        if not all(i in inits for i in dq.input[:3]) or len(dq.input) < 3:
            continue
        scale, zp = arr(dq.input[1]).astype(np.float32), arr(dq.input[2])
        if scale.ndim != 1 or np.any(zp != 0):
            continue  # per-tensor scales or asymmetric weights: left unfolded
        gamma, beta, mean, var = (arr(i).astype(np.float32) for i in bn.input[1:5])
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        f = gamma / np.sqrt(var + np.float32(eps))
        q = arr(dq.input[0])
        if inits[dq.input[0]].data_type not in (_ONNX_INT["int8"], _ONNX_INT["int4"]):
            continue  # an unsigned grid is not closed under negation
        sign = np.where(f < 0, -1, 1).reshape([-1] + [1] * (q.ndim - 1))
        w_type = inits[dq.input[0]].data_type
        q_new = (q.astype(np.int32) * sign).astype(np.int8)
        inits[dq.input[0]].CopyFrom(
            helper.make_tensor(dq.input[0], w_type, list(q_new.shape), q_new.flatten().tolist())
        )
        put(dq.input[1], np.abs(scale * f).astype(np.float32))
        b = arr(conv.input[2]).astype(np.float32) if len(conv.input) > 2 and conv.input[2] else 0.0
        bias = (beta + (b - mean) * f).astype(np.float32)
        bias_name = f"{conv.output[0]}_folded_bias"
        g.initializer.append(numpy_helper.from_array(bias, bias_name))
        inits[bias_name] = g.initializer[-1]
        if len(conv.input) > 2:
            conv.input[2] = bias_name
        else:
            conv.input.append(bias_name)
        conv.output[0] = bn.output[0]
        removed.add(id(bn))
        folded += 1
    keep = [n for n in g.node if id(n) not in removed]
    del g.node[:]
    g.node.extend(keep)
    used = {i for n in g.node for i in n.input}
    unused = [t for t in g.initializer if t.name not in used]
    for t in unused:
        g.initializer.remove(t)
    return folded


def export_onnx(
    qmodel: nn.Module,
    example_input: Any,
    allocation: Allocation | None = None,
    config: ExportConfig | None = None,
    quant_config: dict[str, Any] | None = None,
) -> ExportResult:
    """Export a model wrapped by `quant.apply.apply_allocation` as a QDQ ONNX graph.

    `example_input`: one batch the model accepts (its shapes fix the graph; the batch axis stays dynamic).
    `allocation`: embedded as metadata (default: the bits the layers currently carry).
    """
    onnx = _need_onnx()
    config = config or ExportConfig()
    qlayers = quantized_layers(qmodel)
    if not qlayers:
        raise BitsearchError("the model has no quantized layer: pass the result of apply_allocation")
    if any(q.config.stochastic_rounding for q in qlayers.values()):
        raise BitsearchError("export needs deterministic rounding: quantize with stochastic_rounding=False")
    uncalibrated = [n for n, q in qlayers.items() if q.bits is None]
    if uncalibrated:
        raise BitsearchError(f"layer(s) {uncalibrated[:5]} carry no bits: apply an allocation before export")
    wants_small = any(
        not is_float_bits(q.bits.weight_bits) and q.bits.weight_bits <= 4 for q in qlayers.values()
    )
    notes: list[str] = []
    if config.int4 == "never" or (config.opset is not None and config.opset < INT4_OPSET):
        int4 = False
    elif config.int4 == "always":
        int4 = True
    else:
        int4 = ort_supports_int4()
        if wants_small and not int4:
            notes.append("ONNX Runtime here does not run int4 DequantizeLinear")
    int4 = int4 and wants_small
    if wants_small and not int4:
        notes.append("weights of <= 4 bits are held in int8 containers (values stay on the narrow grid)")
    opset = config.opset or (INT4_OPSET if int4 else DEFAULT_OPSET)

    frozen, layers = _freeze(qmodel, int4)
    example = _as_example(example_input)
    with torch.no_grad():
        frozen_out = frozen(*example)
        ref_out = qmodel.eval()(*example)
    if torch.is_tensor(frozen_out) and torch.is_tensor(ref_out) and not torch.allclose(
        frozen_out, ref_out, rtol=1e-4, atol=1e-4
    ):
        raise BitsearchError("internal: the export form of the model does not reproduce the fake-quant model")
    try:
        data = _torch_export(frozen, example, opset, config.dynamic_batch)
    except BitsearchError:
        raise
    except Exception as exc:
        raise _export_error(frozen, example, exc) from exc
    model = onnx.load_from_string(data)
    _inline_identities(model)

    # Names of the initializers: the buffers keep their module paths (the first path of a shared layer).
    paths = {id(m): p for p, m in frozen.named_modules()}
    retype: dict[str, str] = {}
    for e in layers.values():
        p = paths[id(e)]
        if e.w_cont in ("int4", "uint4"):
            retype[f"{p}.weight_q"] = e.w_cont
            retype[f"{p}.weight_zero_point"] = e.w_cont
        if e.a_cont in ("int4", "uint4"):
            retype[f"{p}.input_zero_point"] = e.a_cont
    if retype:
        _retype(model, retype)
    if config.fold_batchnorm:
        folded = _fold_batchnorm(model)
        notes.append(f"BatchNorm folded into {folded} quantized convolution(s)")

    alloc = allocation or Allocation({n: q.bits for n, q in qlayers.items()})  # type: ignore[misc]
    infos = [layers[n].info for n in qlayers]
    meta = {
        "bitsearch.allocation": alloc.to_json(indent=None),
        "bitsearch.containers": json.dumps([i.to_dict() for i in infos]),
        "bitsearch.notes": json.dumps(notes),
    }
    first = next(iter(qlayers.values()))
    meta["bitsearch.quant_config"] = json.dumps(quant_config or first.config.to_dict())
    onnx.helper.set_model_props(model, meta)
    model.producer_name = "bitsearch"
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise BitsearchError(f"internal: the exported graph does not pass the ONNX checker: {exc}") from exc
    return ExportResult(model=model, layers=infos, opset=opset, notes=notes)


def read_metadata(model) -> dict[str, Any]:
    """The bitsearch metadata of an exported model (allocation as a dict, containers, notes, config)."""
    props = {p.key: p.value for p in model.metadata_props}
    out: dict[str, Any] = {}
    for key in ("bitsearch.allocation", "bitsearch.containers", "bitsearch.notes", "bitsearch.quant_config"):
        if key in props:
            out[key.split(".", 1)[1]] = json.loads(props[key])
    return out


def dequantized_weights(model) -> dict[str, np.ndarray]:
    """Each `DequantizeLinear` of a constant integer weight, evaluated in numpy: {initializer name: float32}."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    out: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        q = numpy_helper.to_array(inits[node.input[0]]).astype(np.int32)
        s = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        z = numpy_helper.to_array(inits[node.input[2]]).astype(np.int32) if len(node.input) > 2 else 0
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if s.ndim == 1:
            shape = [1] * q.ndim
            shape[axis] = -1
            s, z = s.reshape(shape), np.asarray(z).reshape(shape)
        out[node.input[0]] = ((q - z).astype(np.float32) * s).astype(np.float32)
    return out


# --- running in ONNX Runtime ----------------------------------------------------------------------------


def ort_session(model_or_bytes: Any, provider: str = "CPUExecutionProvider", threads: int | None = None):
    """An ONNX Runtime session on `provider` (an error naming the available ones when it is absent)."""
    try:
        import onnxruntime as ort
    except ImportError:  # pragma: no cover
        raise BitsearchError("running ONNX models needs 'onnxruntime': pip install 'bitsearch[export]'") from None
    available = ort.get_available_providers()
    if provider not in available:
        raise BitsearchError(f"execution provider {provider!r} is not available here; available: {available}")
    data = model_or_bytes if isinstance(model_or_bytes, (bytes, bytearray)) else model_or_bytes.SerializeToString()
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(bytes(data), sess_options=opts, providers=[provider])


def ort_predict(session, x: torch.Tensor | np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits of `session` on every item of `x`, in batches."""
    arr = x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)
    arr = arr.astype(np.float32, copy=False)
    name = session.get_inputs()[0].name
    outs = [session.run(None, {name: arr[i : i + batch_size]})[0] for i in range(0, len(arr), batch_size)]
    return np.concatenate(outs, axis=0)


@dataclass
class Fidelity:
    """The exported model against the PyTorch fake-quant model on the same images."""

    n: int
    agreement: float  # top-1 agreement, fraction
    accuracy_torch: float | None
    accuracy_onnx: float | None
    max_abs_logit_diff: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_fidelity(
    qmodel: nn.Module, onnx_model: Any, x: torch.Tensor, y: torch.Tensor | None = None,
    batch_size: int = 256, provider: str = "CPUExecutionProvider",
) -> Fidelity:
    """Run both models on `x`; top-1 agreement, accuracies (with labels) and the largest logit difference."""
    from zoo.evaluate import predict

    ref = predict(qmodel, x, batch_size=batch_size).float().numpy()
    got = ort_predict(ort_session(onnx_model, provider), x, batch_size)
    pr, pg = ref.argmax(1), got.argmax(1)
    acc_t = acc_o = None
    if y is not None:
        yy = y.numpy()
        acc_t, acc_o = float((pr == yy).mean()), float((pg == yy).mean())
    return Fidelity(
        n=len(ref), agreement=float((pr == pg).mean()), accuracy_torch=acc_t, accuracy_onnx=acc_o,
        max_abs_logit_diff=float(np.abs(ref - got).max()),
    )


__all__: Sequence[str] = (
    "ExportConfig", "ExportResult", "Fidelity", "LayerExport", "check_fidelity", "container_for",
    "dequantized_weights", "export_float", "export_onnx", "ort_predict", "ort_session", "ort_supports_int4",
    "read_metadata",
)
