"""Model plumbing shared by the `hessian` and `fisher` methods: gradients of the weights only, captured layer
inputs and outputs, per-sample gradients (unfolded convs), the labels to use, and the deployed weight error
of each bit option."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quant.allocation import LayerBits, is_float_bits
from quant.apply import QuantizedLayer, weights_need_data, _layer_forward, collect_statistics, wrap_model
from quant.errors import BitsearchError

from .base import SensitivityContext

Batch = tuple[torch.Tensor, torch.Tensor | None]
Progress = Callable[[float, str], None]

#: Elements of per-sample gradients materialised at once (chunks of samples keep memory bounded).
_PER_SAMPLE_BUDGET = 1 << 24
#: Elements of unfolded conv patches the Gauss-Newton route keeps between its backward passes (all layers).
_CACHE_BUDGET = 1 << 27


def _no_progress(frac: float, msg: str) -> None:
    pass


# --- model plumbing shared with `fisher` ---------------------------------------------------------------


@contextmanager
def only_weights_require_grad(model: nn.Module, modules: dict[str, nn.Module]) -> Iterator[None]:
    """Within the block, exactly the quantizable layers' weights require grad (restored afterwards)."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        for m in modules.values():
            m.weight.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p, r in saved:
            p.requires_grad_(r)


class Capture:
    """Forward hooks that keep every call's input and output of the given modules.

    With ``alias_inputs`` each module gets a private alias of its input, so a gradient taken with respect to
    ``inputs[name][i]`` is the part flowing through that module only (not through other consumers). With
    ``clone_outputs`` the network continues on a copy of each output, so in-place ops downstream (e.g.
    ``ReLU(inplace=True)`` right after a conv) cannot overwrite the captured output; `capture_forward` turns
    it on only when such an op is detected.
    """

    def __init__(
        self, modules: dict[str, nn.Module], alias_inputs: bool = False, clone_outputs: bool = False
    ):
        self.modules = modules
        self.alias_inputs = alias_inputs
        self.clone_outputs = clone_outputs
        self.inputs: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
        self.outputs: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
        self._versions: list[tuple[torch.Tensor, int]] = []
        self._handles: list[Any] = []

    def __enter__(self) -> Capture:  # noqa: PYI034
        for name, m in self.modules.items():
            if self.alias_inputs:
                self._handles.append(m.register_forward_pre_hook(self._pre))
            self._handles.append(m.register_forward_hook(self._post(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def outputs_modified(self) -> bool:
        """Whether an in-place op changed a captured output after its module returned it."""
        return any(t._version != v for t, v in self._versions)

    @staticmethod
    def _pre(module: nn.Module, args: tuple) -> tuple | None:
        x = args[0]
        if not torch.is_tensor(x):
            return None
        xa = x.view_as(x) if x.requires_grad else x.detach().requires_grad_(True)
        return (xa, *args[1:])

    def _post(self, name: str):
        def fn(module: nn.Module, args: tuple, out: Any) -> Any:
            self.inputs[name].append(args[0])
            self.outputs[name].append(out)
            if torch.is_tensor(out):
                self._versions.append((out, out._version))
                if self.clone_outputs:
                    return out.clone()
            return None

        return fn


def capture_forward(
    model: nn.Module, modules: dict[str, nn.Module], x: torch.Tensor, alias_inputs: bool = False
) -> tuple[torch.Tensor, Capture]:
    """`model(x)` with every call of `modules` captured (see `Capture`)."""
    with Capture(modules, alias_inputs) as cap:
        f = model(x)
    if cap.outputs_modified():
        del cap, f
        with Capture(modules, alias_inputs, clone_outputs=True) as cap:
            f = model(x)
    return f, cap


def _unfold_supported(layer: nn.Module) -> bool:
    return type(layer) in (nn.Conv1d, nn.Conv2d)


def _unfold(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """Conv input patches (N, groups, D_g, L) in the layout of ``weight.flatten(1)``; None if unsupported."""
    if type(layer) is nn.Conv1d:
        x = x.unsqueeze(2)
        k, s, d = (1, layer.kernel_size[0]), (1, layer.stride[0]), (1, layer.dilation[0])
        rp = layer._reversed_padding_repeated_twice
        pad = [rp[0], rp[1], 0, 0]
    elif type(layer) is nn.Conv2d:
        k, s, d = layer.kernel_size, layer.stride, layer.dilation
        pad = list(layer._reversed_padding_repeated_twice)
    else:
        return None
    if any(pad):
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        if mode == "constant" and pad[0] == pad[1] and pad[2] == pad[3]:
            a = F.unfold(x, k, dilation=d, padding=(pad[2], pad[0]), stride=s)
        else:
            a = F.unfold(F.pad(x, pad, mode=mode), k, dilation=d, stride=s)
    else:
        a = F.unfold(x, k, dilation=d, stride=s)
    n, dd, length = a.shape
    return a.reshape(n, layer.groups, dd // layer.groups, length)


class PerSampleGrads:
    """Per-sample weight gradients of one layer from its inputs and output gradients, call by call.

    Linear and Conv1d/Conv2d use a batched matrix product of the output gradient with the input (patches);
    other layer kinds vmap the layer's own vector-Jacobian product over the samples. Conv patches are kept
    between uses while they are small, else unfolded again per chunk of samples (bounded memory).

    `sq_norms` gives the per-sample squared gradient norms. With `norm_uses` (how many output gradients will
    be asked for) it may instead use the Gram matrix of the input patches: ‖g Aᵀ‖² = ⟨g, g K⟩ with K = AᵀA
    over positions, which costs O·L² per use instead of O·L·D (cheaper where positions L < patch size D,
    e.g. late conv stages and Linear layers).
    """

    def __init__(
        self,
        layer: nn.Module,
        inputs: Sequence[torch.Tensor],
        norm_uses: int = 0,
        cache_limit: int | None = None,
    ):
        self.layer = layer
        self.shape = tuple(layer.weight.shape)
        self.numel = layer.weight.numel()
        self.inputs = [x.detach() for x in inputs]
        self.kind = (
            "linear" if isinstance(layer, nn.Linear) else "unfold" if _unfold_supported(layer) else "vmap"
        )
        n = self.inputs[0].shape[0]
        first = self._prepare(self.inputs[0][:1])
        self.per_sample = first.numel()  # prepared elements per sample and call
        need = n * self.per_sample * len(self.inputs)
        cache = self.kind == "linear" or need <= (
            2 * _PER_SAMPLE_BUDGET if cache_limit is None else cache_limit
        )
        self.cached = [self._prepare(x) for x in self.inputs] if cache else None
        self.cached_elems = need if cache and self.kind != "linear" else 0
        self.gram: torch.Tensor | None = None
        if norm_uses and len(self.inputs) == 1 and self.kind != "vmap":
            a = first if first.dim() == 4 else first.transpose(1, 2).unsqueeze(1)  # linear: (1, 1, D, L)
            groups, d, length = a.shape[1], a.shape[2], a.shape[3]
            out = self.shape[0] // groups
            bmm_cost = norm_uses * out * length * d
            gram_cost = length * length * (norm_uses * out + d)
            if groups == 1 and gram_cost < bmm_cost and n * length * length <= _PER_SAMPLE_BUDGET:
                parts = []
                for sl in self.chunks(n):
                    a = self._patches(0, sl)
                    a2 = a[:, 0] if a.dim() == 4 else a.transpose(1, 2)  # (n, D, L)
                    parts.append(torch.bmm(a2.transpose(1, 2), a2))
                self.gram = torch.cat(parts)  # (n, L, L)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return x.reshape(x.shape[0], -1, x.shape[-1])  # (n, L, D)
        if self.kind == "unfold":
            return _unfold(self.layer, x)  # (n, groups, D_g, L)
        return x

    def _patches(self, call: int, sl: slice) -> torch.Tensor:
        if self.cached is not None:
            return self.cached[call][sl]
        return self._prepare(self.inputs[call][sl])

    def chunks(self, n: int) -> list[slice]:
        step = max(1, _PER_SAMPLE_BUDGET // max(1, self.numel + self.per_sample))
        return [slice(i, min(n, i + step)) for i in range(0, n, step)]

    def grads(self, gouts: Sequence[torch.Tensor], sl: slice) -> torch.Tensor:
        """(n, *weight.shape): the per-sample weight gradients of samples `sl`, summed over calls."""
        total = None
        for call, g in enumerate(gouts):
            a, g = self._patches(call, sl), g[sl]
            n = a.shape[0]
            if self.kind == "linear":
                gg = g.reshape(n, -1, g.shape[-1])
                out = torch.bmm(gg.transpose(1, 2), a)
            elif self.kind == "unfold":
                groups = a.shape[1]
                gg = g.reshape(n, groups, -1, a.shape[-1])
                out = torch.matmul(gg, a.transpose(-1, -2))
            else:
                out = self._vmap_grads(a, g)
            out = out.reshape(n, *self.shape)
            total = out if total is None else total + out
        assert total is not None
        return total

    def sq_norms(self, gouts: Sequence[torch.Tensor]) -> torch.Tensor:
        """(N,) float64: the squared Frobenius norm of every sample's weight gradient."""
        n = gouts[0].shape[0]
        if self.gram is not None:
            g = gouts[0]
            length = self.gram.shape[-1]
            if self.kind == "linear":
                gg = g.reshape(n, length, -1).transpose(1, 2)  # (n, O, L)
            else:
                gg = g.reshape(n, -1, length)
            return (torch.bmm(gg, self.gram) * gg).sum((1, 2)).double()
        parts = [self.grads(gouts, sl).flatten(1).double().pow(2).sum(1) for sl in self.chunks(n)]
        return torch.cat(parts)

    def _vmap_grads(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        layer, w = self.layer, self.layer.weight.detach()

        def one(xi: torch.Tensor, gi: torch.Tensor) -> torch.Tensor:
            _, vjp = torch.func.vjp(lambda ww: _layer_forward(layer, xi[None], ww, None), w)
            return vjp(gi[None])[0]

        return torch.func.vmap(one)(x, g)


def labels_for(
    model: nn.Module, batches: list[Batch]
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], bool]:
    """Batches with labels: the given ones, or the float model's argmax predictions (second value False)."""
    if all(y is not None for _, y in batches):
        return [(x, y) for x, y in batches], True  # type: ignore[misc]
    out = []
    with torch.no_grad():
        for x, _ in batches:
            out.append((x, model(x).argmax(1)))
    return out, False


# --- the deployed weight error ---------------------------------------------------------------------------


def quantizer_wrappers(ctx: SensitivityContext, statistics: bool) -> dict[str, QuantizedLayer]:
    """`QuantizedLayer`s for every layer of a private copy of the model, calibrated on the context's data
    when `statistics` (the original model is untouched)."""
    cfg = ctx.options.quant
    qmodel = copy.deepcopy(ctx.model).eval()
    wrappers = wrap_model(qmodel, cfg)
    if statistics:
        collect_statistics(qmodel, wrappers, ctx.x, cfg)
    missing = [l.name for l in ctx.layers if l.name not in wrappers]
    if missing:
        raise BitsearchError(f"layers not found in the wrapped model: {missing[:3]}")
    return wrappers


def weight_option(option: LayerBits | int) -> LayerBits:
    """The weight half of an option (activations float): all that its weight error depends on. An int is
    integer bits by the `QuantConfig`; a `LayerBits` keeps its scheme (int-g, FP8, MXFP4, NVFP4, ternary...)."""
    if isinstance(option, LayerBits):
        return LayerBits(option.weight_bits, 32, option.weight_quantizer, option.scheme)
    return LayerBits(option, 32)


def weight_options(options: Sequence[LayerBits]) -> list[LayerBits]:
    """The distinct weight options of `options`, in order."""
    return list(dict.fromkeys(weight_option(o) for o in options))


def weight_key(option: LayerBits) -> str:
    """How a weight option is named in a table's `extra`: "4" for the config's 4-bit integers (as before
    schemes), else the scheme's name ("int4-g128", "nvfp4", "ternary")."""
    plain = option.scheme is None and option.weight_quantizer is None
    return str(option.weight_bits) if plain else option.scheme_name


@torch.no_grad()
def weight_error(q: QuantizedLayer, bits: int | LayerBits) -> torch.Tensor:
    """Q(W) − W as `QuantizedLayer.set_bits` realises the weight option `bits` (float32 activations): an int
    is integer bits by the `QuantConfig`, a `LayerBits` may name a scheme (its own grid, groups and scales)."""
    q.set_bits(weight_option(bits))
    w = q.layer.weight.detach()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # stochastic rounding, if configured, is then reproducible
        return q.weight_quant(w) - w


def weight_noise_sq(
    ctx: SensitivityContext, progress: Progress = _no_progress
) -> dict[str, dict[LayerBits, float]]:
    """‖Q(W_l) − W_l‖² for every layer and weight option of the context (schemes included), keyed by
    `weight_option`."""
    wopts = weight_options(ctx.options.options)
    # GPTQ rounding and bias correction need the statistics too: the table then prices the deployed error
    need_stats = weights_need_data(ctx.options.quant) and any(not is_float_bits(o.weight_bits) for o in wopts)
    wrappers = quantizer_wrappers(ctx, need_stats)
    out: dict[str, dict[LayerBits, float]] = {}
    for i, layer in enumerate(ctx.layers):
        q = wrappers[layer.name]
        out[layer.name] = {o: float(weight_error(q, o).double().pow(2).sum()) for o in wopts}
        progress((i + 1) / len(ctx.layers), f"weight quantization error: {layer.name}")
    return out


