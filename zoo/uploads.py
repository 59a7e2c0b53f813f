"""Uploaded models and data: readers that never run code from the file, and a `LoadedModel` for each.

Three upload formats are accepted:

* a ``torch.export`` archive (``.pt2``) of any architecture;
* safetensors weights for a zoo architecture (``zoo:NAME``);
* an ``.npz`` data set (read with ``allow_pickle=False`` by `zoo.data.load_npz`).

Pickles (``torch.save`` files, ``.pt``/``.pth``, raw pickle streams) are refused before anything reads them.

Why ``torch.export.load`` is not called on uploads
--------------------------------------------------
In torch 2.13, ``torch.export.load`` followed by ``ExportedProgram.module()`` can run code from the file:
weights or constants flagged ``use_pickle`` are read with ``torch.load(weights_only=False)``; custom and
"opaque" objects with ``pickle.loads``; the sample inputs fall back to ``weights_only=False`` when the safe
reader fails; archives with AOTInductor artifacts load a shared library; ``guards_code`` strings are turned
into Python source and ``exec``-ed by ``.module()``; symbolic-shape strings go through ``sympy.sympify``
(``eval``); and graph targets resolve to any attribute under ``torch``/``operator``/``math``
(``torch.os.system`` included), which runs when the model does. `load_exported_program` therefore reads the
archive itself:

1. only known entries (graph JSON, raw weight/constant bytes, configs); anything else is refused, AOTI too;
2. every weight and constant must be raw bytes (``use_pickle: false``); the pickled sample inputs are never
   read (the example input is rebuilt from the graph's tensor metadata);
3. every graph target must be an ATen/prims operator (minus file I/O), a known control-flow operator or a
   symbolic-integer operation; custom objects are refused; symbolic expressions must be plain arithmetic
   over shape symbols; ``guards_code`` and node metadata (stack traces) are dropped;
4. only then is the validated JSON handed to torch's deserializer, with the tensors already built.

`exported_to_module` then turns the program's ``aten.conv*``/``aten.linear`` calls back into
``nn.Conv*``/``nn.Linear`` submodules (named after their weights, e.g. ``layer1.0.conv1``), so
`quant.layers.discover_layers` and `quant.apply.apply_allocation` work on it as on any module.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import operator
import re
import struct
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quant.errors import BitsearchError

from .data import Normalisation, load_npz
from .models import LoadedModel, ModelSpec, get_model_spec, load_model, load_state_dict_checked

PT2_MODEL_NAME = "model"
#: Entries a plain ``torch.export.save`` archive holds (relative to its root folder).
_PT2_ENTRIES = [
    re.compile(p)
    for p in (
        r"archive_format",
        r"archive_version",
        r"byteorder",
        r"version",
        r"\.data/version",
        r"\.data/serialization_id",
        r"models/model\.json",
        r"data/weights/model_weights_config\.json",
        r"data/weights/weight_\d+",
        r"data/constants/model_constants_config\.json",
        r"data/constants/tensor_\d+",
        r"data/sample_inputs/model\.pt",  # pickled example inputs: present, never read
        r"extra/[A-Za-z0-9_.\-]+",
    )
]
_ALLOWED_NAMESPACES = ("aten", "prims", "quantized_decomposed")
_DENIED_OP_WORDS = ("file", "save", "load", "pickle", "print")
_ALLOWED_HOPS = {"cond", "while_loop", "map_impl", "scan", "wrap_with_set_grad_enabled", "wrap_with_autocast"}
_SYMPY_NAMES = {
    "FloorDiv",
    "ModularIndexing",
    "Where",
    "PythonMod",
    "Mod",
    "CleanDiv",
    "CeilToInt",
    "FloorToInt",
    "CeilDiv",
    "LShift",
    "RShift",
    "PowByNatural",
    "FloatPow",
    "FloatTrueDiv",
    "IntTrueDiv",
    "TruncToFloat",
    "TruncToInt",
    "RoundToInt",
    "RoundDecimal",
    "ToFloat",
    "Identity",
    "IsNonOverlappingAndDenseIndicator",
    "Max",
    "Min",
    "Eq",
    "Ne",
    "Lt",
    "Le",
    "Gt",
    "Ge",
    "And",
    "Or",
    "Not",
    "True",
    "False",
    "oo",
    "Abs",
    "OpaqueUnaryFn_sqrt",
}
_SYMPY_CALLS = _SYMPY_NAMES | {
    "Symbol",
    "Integer",
    "Float",
    "Rational",
    "Add",
    "Mul",
    "Pow",
    "StrictLessThan",
    "LessThan",
    "StrictGreaterThan",
    "GreaterThan",
    "Unequality",
    "Equality",
    "BooleanTrue",
    "BooleanFalse",
    "Infinity",
    "NegativeInfinity",
    "IntInfinity",
    "NegativeIntInfinity",
    "Half",
    "One",
    "Zero",
    "NegativeOne",
}
_SYMBOL_RE = re.compile(r"^[a-z]{1,4}\d{1,9}$")  # s0, s77, u3, ...
_NUMBER_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_LOAD_LOCK = threading.Lock()  # torch's deserializer keeps global state: one load at a time


class UnsafeUploadError(BitsearchError):
    """The upload would need code execution (pickle, exec, native code) to read; it is refused."""


# --------------------------------------------------------------------------------------------------------------
# Sniffing


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sniff_model_format(path: str | Path) -> str:
    """``pt2``, ``safetensors``, ``hf-zip``, ``pickle`` (a torch.save file or a raw pickle) or ``unknown``, by
    content."""
    p = Path(path)
    with open(p, "rb") as f:
        head = f.read(16)
    if not head:
        return "empty"
    # pickle: protocol 2+ starts with PROTO (0x80); protocol 0/1 usually with MARK, GLOBAL, EMPTY_DICT/LIST
    if head[:1] == b"\x80" or re.match(rb"\(|c[\w.]+\n|\}|\]", head):
        return "pickle"
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(p) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return "unknown"
        if any(n == "archive_format" or n.endswith("/archive_format") for n in names):
            return "pt2"
        if any(n.endswith(".pkl") for n in names):
            return "pickle"  # torch.save's zip format: data.pkl inside
        from .hf_upload import is_hf_zip

        if is_hf_zip(names):
            return "hf-zip"  # a zipped Hugging Face model directory (zoo.hf_upload checks its entries)
        return "unknown"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 0 < n <= p.stat().st_size - 8:
            return "safetensors"
    return "unknown"


PICKLE_REFUSED = (
    "pickle files (torch.save checkpoints, .pt/.pth, .pkl) are refused: unpickling can run arbitrary code. "
    "Upload a torch.export archive (torch.export.save(torch.export.export(model, (x,)), 'model.pt2')) or "
    "the weights as safetensors (safetensors.torch.save_file(model.state_dict(), 'w.safetensors')) with the "
    "zoo architecture they belong to."
)


# --------------------------------------------------------------------------------------------------------------
# torch.export archives


def _sym_op_names() -> set[str]:
    try:
        from torch._export.serde.serialize import _SYM_OPS
    except ImportError:  # pragma: no cover - other torch versions
        _SYM_OPS = set()
    names = {"_operator.getitem"}
    for op in _SYM_OPS:
        mod = getattr(op, "__module__", None) or ""
        names.add(f"{mod.replace('torch._ops', 'torch.ops')}.{getattr(op, '__name__', '')}")
    return names


_SYM_OP_NAMES = _sym_op_names()


def _target_allowed(target: str) -> bool:
    if target in _SYM_OP_NAMES:
        return True
    parts = target.split(".")
    if len(parts) < 4 or parts[0] != "torch" or parts[1] != "ops":
        return False
    ns, op = parts[2], parts[3]
    if ns in _ALLOWED_NAMESPACES:
        return not any(w in op.lower() for w in _DENIED_OP_WORDS) and not op.startswith("__")
    if ns == "higher_order":
        return op in _ALLOWED_HOPS and len(parts) == 4
    return False


def _check_expr(expr: Any) -> None:
    """Symbolic shapes are stored as sympy `srepr` strings that torch later `sympify`s (an `eval`): accept
    only calls of sympy constructors on literals and shape symbols, e.g.
    ``Mul(Integer(2), Symbol('s0', integer=True))``."""
    if not isinstance(expr, str) or len(expr) > 2000 or "__" in expr:
        raise UnsafeUploadError(
            f"the archive holds a malformed symbolic-shape expression: {str(expr)[:80]!r}"
        )
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError):
        raise UnsafeUploadError(
            f"the archive holds a malformed symbolic-shape expression: {expr[:80]!r}"
        ) from None
    for node in ast.walk(tree):
        if isinstance(node, (ast.Expression, ast.Load, ast.operator, ast.unaryop, ast.cmpop, ast.boolop)):
            continue
        if isinstance(node, (ast.BinOp, ast.UnaryOp, ast.Compare, ast.BoolOp, ast.keyword)):
            if isinstance(node, ast.keyword) and (
                node.arg is None or not isinstance(node.value, ast.Constant)
            ):
                break
            continue
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name) and node.func.id in _SYMPY_CALLS:
                continue
            break
        if isinstance(node, ast.Name):
            if node.id in _SYMPY_CALLS or node.id in _SYMPY_NAMES or _SYMBOL_RE.match(node.id):
                continue
            break
        if isinstance(node, ast.Constant):
            v = node.value
            if isinstance(v, (bool, int, float)) or (
                isinstance(v, str) and (_SYMBOL_RE.match(v) or _NUMBER_RE.match(v))
            ):
                continue
            break
        break
    else:
        return
    raise UnsafeUploadError(f"the archive's symbolic-shape expression {expr[:80]!r} is not plain arithmetic")


def _sanitise_graph_json(obj: Any, depth: int = 0) -> None:
    """Validate (and strip metadata from) the serialized program in place; raise on anything unsafe."""
    if depth > 64:
        raise BitsearchError("the archive's graph JSON is nested too deeply")
    if isinstance(obj, dict):
        if isinstance(obj.get("target"), str) and isinstance(obj.get("inputs"), list):  # a graph node
            if not _target_allowed(obj["target"]):
                raise UnsafeUploadError(
                    f"the exported graph calls {obj['target']!r}, which bitsearch does not run from uploads "
                    "(allowed: ATen/prims operators, control flow, symbolic integer arithmetic)"
                )
            obj["metadata"] = {}
        for key, value in obj.items():
            if key == "as_operator" and isinstance(value, str) and not _target_allowed(value):
                raise UnsafeUploadError(
                    f"the exported graph passes the operator {value!r}, which is not allowed"
                )
            if key in ("as_custom_obj", "custom_obj_values") and value:
                raise UnsafeUploadError(
                    "the exported graph holds custom (torchbind) objects, which need pickle"
                )
            if key == "expr_str":
                _check_expr(value)
            _sanitise_graph_json(value, depth + 1)
    elif isinstance(obj, list):
        for item in obj:
            _sanitise_graph_json(item, depth + 1)


def _check_payload_config(text: str, what: str, prefix: str) -> None:
    try:
        cfg = json.loads(text)
        entries = cfg["config"]
        assert isinstance(entries, dict)
    except Exception:
        raise BitsearchError(f"the archive's {what} config is not valid JSON") from None
    for fqn, meta in entries.items():
        if not isinstance(meta, dict):
            raise BitsearchError(f"the archive's {what} config entry {fqn!r} is malformed")
        if meta.get("use_pickle"):
            raise UnsafeUploadError(
                f"the archive stores {what} {fqn!r} as a pickle; only raw tensors are accepted "
                "(tensor subclasses and custom objects need pickle)"
            )
        if not str(meta.get("path_name", "")).startswith(prefix):
            raise UnsafeUploadError(f"the archive's {what} {fqn!r} is not a plain tensor")


def _check_archive_entries(path: Path, max_expanded: int) -> None:
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise BitsearchError(f"not a readable torch.export archive (zip): {exc}") from None
    if not infos:
        raise BitsearchError("the torch.export archive is empty")
    root = infos[0].filename.split("/", 1)[0]
    total = 0
    for info in infos:
        name = info.filename
        if not name.startswith(root + "/"):
            raise BitsearchError(f"the archive mixes top-level folders ({root!r} and {name!r})")
        rel = name[len(root) + 1 :]
        if info.is_dir() or rel == "":
            continue
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise BitsearchError(f"archive entry {rel!r} uses an unsupported compression")
        if rel.startswith("data/aotinductor/") or rel.endswith((".so", ".dll", ".dylib", ".cpp")):
            raise UnsafeUploadError(
                f"the archive holds compiled code ({rel!r}); AOTInductor packages are refused (native code). "
                "Upload the output of torch.export.save instead"
            )
        if rel.endswith(".pkl") or rel in ("data/weights/model.pt", "data/constants/model.pt"):
            raise UnsafeUploadError(f"the archive holds a pickle ({rel!r}); " + PICKLE_REFUSED)
        if not any(p.fullmatch(rel) for p in _PT2_ENTRIES):
            raise BitsearchError(
                f"unexpected entry {rel!r} in the torch.export archive; upload a file written by "
                "torch.export.save (one program named 'model', plain tensors)"
            )
        total += info.file_size
        if total > max_expanded:
            raise BitsearchError(f"the archive expands to more than {max_expanded} bytes")


def load_exported_program(path: str | Path, max_expanded: int | None = None) -> torch.export.ExportedProgram:
    """Read a ``torch.export.save`` archive without unpickling, exec or native code (see the module doc).

    `max_expanded` bounds the archive's unpacked size (default: twice the file, at least 64 MiB; torch
    stores entries uncompressed, so a larger figure means a zip bomb)."""
    p = Path(path)
    if max_expanded is None:
        max_expanded = max(2 * p.stat().st_size, 64 << 20)
    _check_archive_entries(p, max_expanded)
    try:
        from torch._export.serde import schema
        from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass
        from torch.export.pt2_archive._package import PT2ArchiveReader, _load_constants, _load_state_dict
    except ImportError as exc:  # pragma: no cover - other torch versions
        raise BitsearchError(
            f"this torch ({torch.__version__}) cannot read .pt2 uploads safely: {exc}"
        ) from None
    with _LOAD_LOCK:
        try:
            reader = PT2ArchiveReader(str(p))
            names = set(reader.get_file_names())
            version = reader.read_string("archive_version") if "archive_version" in names else None
        except BitsearchError:
            raise
        except Exception as exc:
            raise BitsearchError(f"not a readable torch.export archive: {exc}") from None
        if version != "0":
            raise BitsearchError(f"unsupported .pt2 archive version {version!r} (this torch writes '0')")
        if "models/model.json" not in names:
            raise BitsearchError("the archive holds no program named 'model' (models/model.json)")
        for what, cfg, prefix in (
            ("weight", "data/weights/model_weights_config.json", "weight_"),
            ("constant", "data/constants/model_constants_config.json", "tensor_"),
        ):
            if cfg not in names:
                raise BitsearchError(f"the archive has no {cfg}; was it written by torch.export.save?")
            _check_payload_config(reader.read_string(cfg), what, prefix)
        try:
            program = json.loads(reader.read_bytes("models/model.json"))
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise BitsearchError(f"the archive's program is not valid JSON: {str(exc)[:200]}") from None
        if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict):
            raise BitsearchError("the archive's program JSON has no graph_module")
        _sanitise_graph_json(program["graph_module"])
        for key in program.get("range_constraints") or {}:
            _check_expr(key)
        program["guards_code"] = []  # Python source that .module() would exec
        try:
            serialized = _dict_to_dataclass(schema.ExportedProgram, program)
            state_dict = _load_state_dict(reader, PT2_MODEL_NAME)
            constants = _load_constants(reader, PT2_MODEL_NAME)
            if not isinstance(state_dict, dict) or not isinstance(constants, dict):
                raise UnsafeUploadError("the archive stores its tensors in the legacy pickled form")
            ep = ExportedProgramDeserializer().deserialize(serialized, state_dict, constants, None)
        except BitsearchError:
            raise
        except Exception as exc:
            raise BitsearchError(
                f"cannot read the torch.export archive ({type(exc).__name__}: {str(exc)[:300]}); it must be "
                "written "
                f"by torch.export.save of a compatible torch version (this is {torch.__version__})"
            ) from None
    _check_program_targets(ep.graph_module)
    return ep


def _check_program_targets(gm: torch.fx.GraphModule) -> None:
    """After loading: every call is an allowed operator object (not only a string that looked like one)."""
    allowed_sym = set()
    try:
        from torch._export.serde.serialize import _SYM_OPS

        allowed_sym = set(_SYM_OPS)
    except ImportError:  # pragma: no cover
        pass
    allowed_sym.add(operator.getitem)
    for module in gm.modules():
        graph = getattr(module, "graph", None)
        if graph is None:
            continue
        for node in graph.nodes:
            if node.op == "call_module" or node.op == "call_method":
                raise UnsafeUploadError(
                    f"the exported graph has a {node.op} node ({node.target}); not allowed"
                )
            if node.op != "call_function":
                continue
            t = node.target
            if t in allowed_sym:
                continue
            if isinstance(t, torch._ops.OpOverload) and t.namespace in _ALLOWED_NAMESPACES:
                if not any(w in t.__name__.lower() for w in _DENIED_OP_WORDS):
                    continue
            if isinstance(t, torch._ops.HigherOrderOperator) and t.name() in _ALLOWED_HOPS:
                continue
            raise UnsafeUploadError(f"the exported graph calls {t!r}, which is not allowed")


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
        from .hf import load_hf_model

        return load_hf_model(text, weights)
    if not text.startswith("zoo:") and text.endswith(".zip"):  # an uploaded Hugging Face model directory
        from .hf_upload import load_hf_zip

        return load_hf_zip(text, weights)
    if not text.startswith("zoo:") and text.endswith(".pt2"):
        if weights is not None:
            raise BitsearchError("an exported (.pt2) model carries its own weights; do not give weights")
        return load_exported_model(text)
    return load_model(text, weights)


# --------------------------------------------------------------------------------------------------------------
# Inspecting uploads (what the service stores about them)


def _layers_info(loaded: LoadedModel) -> dict[str, Any]:
    from quant.layers import discover_layers

    layers = discover_layers(loaded.model, loaded.example_input)
    return {
        "input_shape": list(loaded.spec.input_shape),
        "num_classes": loaded.num_classes,
        "layers": [{"name": l.name, "kind": l.kind, "params": l.params, "macs": l.macs} for l in layers],
        "layer_count": len(layers),
        "params": int(sum(l.params for l in layers)),
    }


def inspect_exported_upload(path: str | Path, normalisation: Normalisation | None = None) -> dict[str, Any]:
    return {**_layers_info(load_exported_model(path, normalisation=normalisation)), "format": "pt2"}


def inspect_safetensors_upload(path: str | Path, architecture: str) -> dict[str, Any]:
    """Check that the safetensors file fits the zoo architecture (names, shapes, float dtypes)."""
    spec = get_model_spec(architecture)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise BitsearchError(f"not a readable safetensors file: {exc}") from None
    if not state:
        raise BitsearchError("the safetensors file holds no tensors")
    state = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = spec.builder()
    load_state_dict_checked(model, state, "the uploaded file")
    model.eval()
    example = torch.randn((2, *spec.input_shape), generator=torch.Generator().manual_seed(0))
    loaded = LoadedModel(spec.name, model, example, spec.num_classes, spec.normalisation, spec)
    return {**_layers_info(loaded), "format": "safetensors", "architecture": spec.ref}


def inspect_dataset_upload(path: str | Path, normalisation: Normalisation | None = None) -> dict[str, Any]:
    """Validate an ``.npz`` (never unpickling) and describe it."""
    ds = load_npz(path, normalisation)
    info: dict[str, Any] = {
        "items": int(len(ds)),
        "item_shape": list(ds.x.shape[1:]),
        "labels": ds.y is not None,
    }
    if ds.y is not None and len(ds.y):
        info["classes"] = int(ds.y.max().item()) + 1
    if not math.isfinite(float(ds.x.abs().max().item())):
        raise BitsearchError("x holds non-finite values")
    return info
