"""`measured`: quantize one layer at a time and measure what the network loses (AIMET AMP's per-layer sweep).

For every layer and every bit option, that layer alone is fake-quantized (weights, and its input activation
when the option quantizes activations; every other layer stays in float) and the increase of the task loss
over the float model is measured on the context's data:

- `metric="loss"` (default with labels): mean per-sample increase of the cross-entropy with the labels;
- `metric="kl"` (default without labels): mean per-sample KL(float ‖ quantized) of the softmax outputs.

`stderr` is the standard error of that mean over the samples (the per-sample increases are paired with the
float model's own, so the float model's variance cancels out).

Speed. The model is copied and wrapped once (`wrap_model`), calibrated once when an option needs it
(`collect_statistics` with `options.quant`), and each option is applied with `QuantizedLayer.set_bits`, which
re-derives the quantizers from the stored statistics without touching the data. Quantizing layer L cannot
change anything that finished computing before L starts, so per layer the float *prefix* runs once: the
outputs of the outermost modules that complete before L's first call are cached (one prefix pass, stopped at
L's input), and each option then re-runs only the *suffix*: those modules return their cached outputs
instead of computing. This needs no graph tracing and holds for any module structure (skip connections,
modules called several times: each module replays its cached calls in order, then computes). The cache is
one prefix's boundary activations for the samples of one chunk; chunks are sized to `params["cache_mb"]`
(default 512 MiB). `cost["passes"]` counts full-model forward passes over the data, a prefix or suffix
pass counting as the fraction of the model's MACs it runs; `cost["naive_passes"]` is what one full pass per
cell would have cost. `params["suffix_cache"]=False` turns the trick off (one full pass per cell).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from quant.allocation import LayerBits, is_float_bits
from quant.apply import DATA_CLIPS, QuantizedLayer, collect_statistics, wrap_model
from quant.errors import BitsearchError

from quant.registry import check_choice, check_positive

from .base import SensitivityContext, SensitivityMethod, register_method
from .table import SensitivityTable

METRICS = ("loss", "kl")
DEFAULT_CACHE_MB = 512


def _logits(output: Any) -> torch.Tensor:
    if torch.is_tensor(output):
        return output
    logits = getattr(output, "logits", None)
    if torch.is_tensor(logits):
        return logits
    if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        return output[0]
    raise BitsearchError(f"the model returned a {type(output).__name__}; expected a tensor of logits")


def per_sample_metric(logits: torch.Tensor, ref_logits: torch.Tensor, y: torch.Tensor | None, metric: str):
    """Per-sample cross-entropy (metric 'loss') or KL(ref ‖ logits) (metric 'kl'), float64, shape (N,)."""
    logits = logits.double().reshape(-1, logits.shape[-1])
    if metric == "loss":
        assert y is not None
        return F.cross_entropy(logits, y.reshape(-1), reduction="none")
    log_p = F.log_softmax(ref_logits.double().reshape(-1, logits.shape[-1]), dim=1)
    log_q = F.log_softmax(logits, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(1).clamp(min=0.0)


def _clone_tree(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.clone()
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_clone_tree(o) for o in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_clone_tree(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _clone_tree(v) for k, v in obj.items()}
    return obj


def _tree_bytes(obj: Any) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_tree_bytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_tree_bytes(o) for o in obj.values())
    return 0


class _Stop(Exception):
    """Raised at the target layer's input to end a prefix pass."""


class PrefixCache:
    """Run a model up to a target module's first call, and replay the model from there.

    `capture(x)` runs `model(x)` until `target` is called and returns, per module, the outputs of its
    outermost calls that completed before (in call order): those are the only values that are needed to
    compute the rest and that quantizing `target` cannot change. `replay(x, cache)` runs `model(x)` with
    those modules answering from the cache (a copy, so in-place operations downstream cannot corrupt it).
    """

    def __init__(self, model: nn.Module, target: nn.Module):
        self.model = model
        self.target = target
        inside = set(id(m) for m in target.modules())
        self.watched = [m for m in model.modules() if m is not model and id(m) not in inside]

    @torch.no_grad()
    def capture(self, x: torch.Tensor) -> dict[int, list[Any]]:
        stack: list[list[tuple[nn.Module, Any]]] = [[]]  # completed child calls per open frame

        def pre(module, args):
            stack.append([])

        def post(module, args, output):
            stack.pop()
            stack[-1].append((module, output))

        def stop(module, args):
            raise _Stop

        handles = [self.target.register_forward_pre_hook(stop)]
        for m in self.watched:
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post))
        try:
            self.model(x)
        except _Stop:
            pass
        else:
            raise BitsearchError("the layer did not run in the forward pass; cannot measure it")
        finally:
            for h in handles:
                h.remove()
        cache: dict[int, list[Any]] = {}
        for frame in stack:
            for module, output in frame:
                cache.setdefault(id(module), []).append(output)
        return cache

    @torch.no_grad()
    def replay(self, x: torch.Tensor, cache: dict[int, list[Any]]) -> Any:
        patched: list[tuple[nn.Module, Any]] = []
        by_id = {id(m): m for m in self.watched}
        try:
            for key, outputs in cache.items():
                module = by_id[key]
                queue = list(outputs)
                original = module.__dict__.get("forward")
                real_forward = module.forward

                def forward(*args, _q=queue, _real=real_forward, **kwargs):
                    if _q:
                        return _clone_tree(_q.pop(0))
                    return _real(*args, **kwargs)

                module.forward = forward
                patched.append((module, original))
            return self.model(x)
        finally:
            for module, original in patched:
                if original is None:
                    del module.forward
                else:
                    module.forward = original


@register_method
class MeasuredSensitivity(SensitivityMethod):
    """The ground truth the proxies approximate: one layer quantized at a time, loss measured."""

    name = "measured"
    covers_activations = True
    needs_labels = False

    @dataclass
    class Config:
        """metric: "loss" or "kl" (default: loss with labels, else kl); the suffix cache, see the module."""

        metric: str | None = None
        suffix_cache: bool = True
        cache_mb: float = DEFAULT_CACHE_MB

        def __post_init__(self) -> None:
            if self.metric is not None:
                check_choice(self.metric, METRICS, "metric")
            if not isinstance(self.suffix_cache, bool):
                raise BitsearchError("suffix_cache must be true or false")
            check_positive(self.cache_mb, "cache_mb")

    def compute(self, ctx: SensitivityContext) -> SensitivityTable:
        t0 = time.perf_counter()
        opts = ctx.options
        params = dict(opts.params)
        metric = params.get("metric") or ("loss" if ctx.y is not None else "kl")
        if metric not in METRICS:
            raise BitsearchError(f"measured: unknown metric {metric!r}; known: {list(METRICS)}")
        if metric == "loss" and ctx.y is None:
            raise BitsearchError(
                "measured: metric 'loss' needs labelled data; use metric 'kl' without labels"
            )
        use_suffix = bool(params.get("suffix_cache", True))
        cache_bytes = float(params.get("cache_mb", DEFAULT_CACHE_MB)) * 2**20
        options: list[LayerBits] = opts.options
        config = opts.quant

        qmodel = copy.deepcopy(ctx.model).eval()
        wrappers = wrap_model(qmodel, config)
        names = [info.name for info in ctx.layers]
        missing = [n for n in names if n not in wrappers]
        if missing:
            raise BitsearchError(f"measured: layer(s) {missing[:3]} not found in the model")
        batches = ctx.batches()
        passes = 0.0
        needs_stats = (
            any(not is_float_bits(o.activation_bits) for o in options)
            or config.weight_clip in DATA_CLIPS
            or config.bias_correction
        )
        if needs_stats:
            collect_statistics(qmodel, wrappers, ctx.x, config)
            passes += min(ctx.x.shape[0], config.calibration_samples) / ctx.x.shape[0]

        # Float reference: logits and the per-sample metric of the float model.
        with torch.no_grad():
            ref_logits = [_logits(qmodel(xb)).detach() for xb, _ in batches]
        passes += 1.0
        ys = [yb for _, yb in batches]
        base = [per_sample_metric(r, r, y, metric) for r, y in zip(ref_logits, ys)]
        n = sum(len(b) for b in base)

        total_macs = sum(info.macs for info in ctx.layers) or 1
        macs_before = np.cumsum([0] + [info.macs for info in ctx.layers])[:-1] / total_macs

        values = np.full((len(names), len(options)), np.nan)
        stderr = np.full_like(values, np.nan)
        n_cells = len(names) * len(options)
        done = 0
        for i, name in enumerate(names):
            q: QuantizedLayer = wrappers[name]
            prefix = macs_before[i] if use_suffix else 0.0
            suffix = 1.0 - prefix
            deltas: list[list[torch.Tensor]] = [[] for _ in options]
            cacher = PrefixCache(qmodel, q) if use_suffix and prefix > 0 else None
            b = 0
            while b < len(batches):
                # The next chunk of batches whose prefix caches fit in the memory budget together.
                chunk, caches, used = [], [], 0
                while b < len(batches):
                    if cacher is not None:
                        if chunk and used + used / len(chunk) > cache_bytes:
                            break
                        c = cacher.capture(batches[b][0])
                        used += _tree_bytes(list(c.values()))
                        caches.append(c)
                        passes += prefix * len(batches[b][0]) / n
                    chunk.append(b)
                    b += 1
                for j, opt in enumerate(options):
                    q.set_bits(opt)
                    with torch.no_grad():
                        for k, bi in enumerate(chunk):
                            xb = batches[bi][0]
                            out = qmodel(xb) if cacher is None else cacher.replay(xb, caches[k])
                            m = per_sample_metric(_logits(out), ref_logits[bi], ys[bi], metric)
                            deltas[j].append(m - base[bi])
                    passes += suffix * sum(len(batches[bi][0]) for bi in chunk) / n
                    q.bits = None  # back to float for the next layer
                del caches
            for j in range(len(options)):
                d = torch.cat(deltas[j]).double()
                values[i, j] = float(d.mean())
                stderr[i, j] = float(d.std(unbiased=True) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
            done += len(options)
            ctx.progress(done / n_cells, f"measured {name} ({i + 1}/{len(names)})")

        seconds = time.perf_counter() - t0
        return SensitivityTable(
            method=self.name,
            layers=list(ctx.layers),
            options=options,
            values=values,
            stderr=stderr,
            settings={
                "metric": metric,
                "suffix_cache": use_suffix,
                "cache_mb": cache_bytes / 2**20,
                "definition": (
                    "mean per-sample increase of the cross-entropy with the labels"
                    if metric == "loss"
                    else "mean per-sample KL(float || quantized) of the softmax outputs"
                )
                + " when only this layer is quantized at this option (others float)",
            },
            cost={
                "passes": round(float(passes), 3),
                "naive_passes": float(1 + len(names) * len(options) + (1 if needs_stats else 0)),
                "seconds": seconds,
                "samples": n,
            },
        )
