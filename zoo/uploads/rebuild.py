"""An exported program turned back into a module with real ``nn.Conv*``/``nn.Linear`` layers, and the
`LoadedModel` of an uploaded model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quant.errors import BitsearchError

from ..data import Normalisation
from ..models import LoadedModel, ModelSpec, load_model
from .archive import load_exported_program

# --------------------------------------------------------------------------------------------------------------
# Exported program -> module with real layers


def _schema_args(node: torch.fx.Node) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i, a in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
    return out


def _tup(v: Any, n: int) -> Any:
    if isinstance(v, str):
        return v
    if isinstance(v, (list, tuple)):
        return tuple(int(x) for x in v) if len(v) != 1 else (int(v[0]),) * n
    return (int(v),) * n


def _layer_for(node: torch.fx.Node, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module | None:
    aten = torch.ops.aten
    a = _schema_args(node)
    t = node.target
    has_bias = bias is not None
    if t == aten.linear.default:
        if weight.dim() != 2:
            return None
        m = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta")
    else:
        transposed = False
        if t == aten.convolution.default:
            transposed = bool(a.get("transposed"))
        elif t == aten.conv_transpose2d.input:
            transposed = True
        nd = weight.dim() - 2
        groups = int(a.get("groups", 1))
        common = dict(
            stride=_tup(a.get("stride", 1), nd),
            padding=_tup(a.get("padding", 0), nd),
            dilation=_tup(a.get("dilation", 1), nd),
            groups=groups,
            bias=has_bias,
            device="meta",
        )
        if transposed:
            if nd != 2:
                return None
            m = nn.ConvTranspose2d(
                weight.shape[0],
                weight.shape[1] * groups,
                tuple(weight.shape[2:]),
                output_padding=_tup(a.get("output_padding", 0), nd),
                **common,
            )
        else:
            cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}.get(nd)
            if cls is None:
                return None
            m = cls(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), **common)
    m.weight = (
        weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight.detach(), requires_grad=False)
    )
    if has_bias:
        m.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias.detach(), requires_grad=False)
    return m


def _layer_targets() -> set:
    aten = torch.ops.aten
    return {
        aten.linear.default,
        aten.conv1d.default,
        aten.conv2d.default,
        aten.conv3d.default,
        aten.conv1d.padding,
        aten.conv2d.padding,
        aten.conv3d.padding,
        aten.convolution.default,
        aten.conv_transpose2d.input,
    }


def exported_to_module(ep: torch.export.ExportedProgram) -> nn.Module:
    """An eval-mode `nn.Module` computing `ep`, whose convolutions and linear layers are real submodules."""
    gm = ep.module(check_guards=False)
    graph = gm.graph
    targets = _layer_targets()
    made: dict[tuple, str] = {}
    used_names: set[str] = set(dict(gm.named_modules()))
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in targets:
            continue
        a = _schema_args(node)
        w_node, b_node = a.get("weight"), a.get("bias")
        if not isinstance(w_node, torch.fx.Node) or w_node.op != "get_attr":
            continue
        if b_node is not None and (not isinstance(b_node, torch.fx.Node) or b_node.op != "get_attr"):
            continue
        weight = (
            gm.get_parameter(w_node.target) if _is_param(gm, w_node.target) else _fetch(gm, w_node.target)
        )
        bias = None
        if b_node is not None:
            bias = (
                gm.get_parameter(b_node.target) if _is_param(gm, b_node.target) else _fetch(gm, b_node.target)
            )
        key = (
            node.target,
            w_node.target,
            getattr(b_node, "target", None),
            repr(node.args[2:]),
            repr(node.kwargs),
        )
        name = made.get(key)
        if name is None:
            layer = _layer_for(node, weight, bias)
            if layer is None:
                continue
            name = _install(gm, layer, w_node.target, getattr(b_node, "target", None), used_names)
            made[key] = name
        inp = a["input"]
        with graph.inserting_before(node):
            new = graph.call_module(name, (inp,))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    graph.lint()
    out = torch.fx.GraphModule(gm, graph, class_name="ExportedModel")
    return out.eval()


def _is_param(gm: nn.Module, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False


def _fetch(gm: nn.Module, target: str) -> torch.Tensor:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _install(gm: nn.Module, layer: nn.Module, w_target: str, b_target: str | None, used: set[str]) -> str:
    """Put `layer` where its weight lives when that place is a plain holder of just these tensors."""
    prefix, _, leaf = w_target.rpartition(".")
    if prefix and leaf == "weight" and (b_target is None or b_target == f"{prefix}.bias"):
        try:
            owner = gm.get_submodule(prefix)
        except AttributeError:
            owner = None
        if (
            owner is not None
            and type(owner) is nn.Module
            and not owner._modules
            and not owner._buffers
            and set(owner._parameters) <= {"weight", "bias"}
            and (("bias" in owner._parameters) == (b_target is not None))
        ):
            parent_name, _, child = prefix.rpartition(".")
            parent = gm.get_submodule(parent_name) if parent_name else gm
            parent._modules[child] = layer
            return prefix
    base = (prefix or w_target).replace(".", "_") + "_layer"
    name, i = base, 1
    while name in used:
        i += 1
        name = f"{base}{i}"
    used.add(name)
    gm.add_module(name, layer)
    return name


def _example_shape(ep: torch.export.ExportedProgram) -> tuple[list[int], bool]:
    """The one user input's shape (dynamic dims at their smallest useful size); whether dim 0 is dynamic."""
    user = list(ep.graph_signature.user_inputs)
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    tensors = [placeholders[u] for u in user if u in placeholders]
    if len(user) != 1 or len(tensors) != 1:
        raise BitsearchError(
            f"the exported model takes {len(user)} inputs; bitsearch needs a model of one input tensor "
            "(a batch)"
        )
    val = tensors[0].meta.get("val")
    if not isinstance(val, torch.Tensor) or not val.is_floating_point():
        raise BitsearchError("the exported model's input must be a floating-point tensor")
    shape, dynamic0 = [], False
    for i, d in enumerate(val.shape):
        if isinstance(d, int):
            shape.append(int(d))
            continue
        if i == 0:
            dynamic0 = True
        lo = 2
        try:
            vr = ep.range_constraints.get(d.node.expr)
            if vr is not None and int(vr.lower) > lo:
                lo = int(vr.lower)
        except Exception:
            pass
        shape.append(lo)
    if not shape:
        raise BitsearchError("the exported model's input has no batch dimension")
    return shape, dynamic0


@dataclass(frozen=True)
class UploadedModelSpec(ModelSpec):
    """A `ModelSpec` for an uploaded model; `ref` is the upload's own reference, not a zoo name."""

    upload_ref: str = ""

    @property
    def ref(self) -> str:  # type: ignore[override]
        return self.upload_ref or self.name


def _no_builder() -> nn.Module:
    raise BitsearchError("an uploaded model cannot be rebuilt from scratch; load it from its file")


def load_exported_model(
    path: str | Path, ref: str | None = None, normalisation: Normalisation | None = None
) -> LoadedModel:
    """A `LoadedModel` for an uploaded ``.pt2``: layers as submodules, a batch-of-2 example input."""
    p = Path(path)
    ep = load_exported_program(p)
    shape, dynamic0 = _example_shape(ep)
    model = exported_to_module(ep)
    gen = torch.Generator().manual_seed(0)
    batch = 2 if dynamic0 or shape[0] == 1 else shape[0]
    example = torch.randn([batch, *shape[1:]], generator=gen)
    try:
        with torch.no_grad():
            out = model(example)
            ref_out = ep.module(check_guards=False)(example)
            other = model(torch.randn([batch + 1, *shape[1:]], generator=gen))
    except BitsearchError:
        raise
    except Exception as exc:
        raise BitsearchError(
            f"the exported model does not run on a batch of shape {tuple(example.shape)} / "
            f"{(batch + 1, *shape[1:])} ({type(exc).__name__}: {str(exc)[:200]}); export it with a dynamic "
            "batch dimension: torch.export.export(model, (x,), "
            "dynamic_shapes=({0: torch.export.Dim('batch')},))"
        ) from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or not isinstance(other, torch.Tensor):
        raise BitsearchError("the exported model must return one tensor of logits, shape (batch, classes)")
    if not torch.allclose(out, ref_out, rtol=1e-4, atol=1e-5):
        raise BitsearchError(
            "internal check failed: the re-layered exported model does not match the original"
        )
    name = f"upload-{p.stem}"
    spec = UploadedModelSpec(
        name=name,
        description=f"uploaded torch.export program {p.name}",
        input_shape=tuple(shape[1:]),
        num_classes=int(out.shape[1]),
        normalisation=normalisation,
        builder=_no_builder,
        upload_ref=ref or str(p),
    )
    return LoadedModel(
        name=name,
        model=model,
        example_input=example,
        num_classes=int(out.shape[1]),
        normalisation=normalisation,
        spec=spec,
        pretrained=True,
        source=f"upload {p}",
    )


def load_any_model(ref: str, weights: str | Path | None = None) -> LoadedModel:
    """`zoo.load_model` for ``zoo:`` references, `load_exported_model` for a path to a ``.pt2`` file,
    `zoo.hf.load_hf_model` for ``hf:DIR`` (a local Hugging Face model directory)."""
    text = str(ref)
    if text.startswith("hf:"):
        from zoo.hf import load_hf_model

        return load_hf_model(text, weights)
    if not text.startswith("zoo:") and text.endswith(".zip"):  # an uploaded Hugging Face model directory
        from zoo.hf_upload import load_hf_zip

        return load_hf_zip(text, weights)
    if not text.startswith("zoo:") and text.endswith(".pt2"):
        if weights is not None:
            raise BitsearchError("an exported (.pt2) model carries its own weights; do not give weights")
        return load_exported_model(text)
    return load_model(text, weights)
