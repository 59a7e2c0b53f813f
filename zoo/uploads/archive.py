"""Reading a ``torch.export`` archive (``.pt2``) without running code from it.

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
import json
import operator
import re
import threading
import zipfile
from pathlib import Path
from typing import Any

import torch

from quant.errors import BitsearchError

from .sniff import PICKLE_REFUSED, UnsafeUploadError

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
