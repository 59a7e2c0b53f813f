"""`orthogonality`: OMPQ's network-orthogonality importance (Ma et al., AAAI 2023).

OMPQ ("OMPQ: Orthogonal Mixed Precision Quantization") ranks layers by how *orthogonal* their features are to
the features of every other layer, from a single batch of inputs and no labels:

1. One forward pass of one batch of N samples (`params["batch"]`, default all the context's samples, i.e. up
   to `options.samples`); per layer i the features X_i (N × d_i, flattened per sample)
   give the linear-kernel Gram matrix K_i = X_i X_iᵀ (N × N), centred: K̃_i = H K_i H, H = I − 11ᵀ/N.
2. The orthogonality metric between two layers is the normalised Frobenius inner product of their centred
   Gram matrices (linear CKA):  ORM(i, j) = ⟨K̃_i, K̃_j⟩_F / (‖K̃_i‖_F ‖K̃_j‖_F) ∈ [0, 1];
   ORM = 0 means the two layers' features are orthogonal (each carries information the other lacks).
3. γ_i = Σ_{j≠i} ORM(i, j) (how much of layer i the rest of the network already spans) and the importance
   θ_i = exp(−β γ_i): a monotonically decreasing function, so more orthogonal layers are more important.
4. OMPQ's linear program gives layer i (in execution order, L layers) the objective weight
   w_i = (1 / (L − i)) Σ_{j ≥ i} θ_j (0-based i: the mean importance of the layer and everything after it,
   since quantizing layer i perturbs all later features), and maximises Σ_i w_i · b_i under the size budget.

Everything the LP needs is kept in `table.extra`: `orthogonality_importance` (θ), `orthogonality_gamma`
(γ), `orthogonality_matrix` (ORM), `lp_weight` (w), `beta`, and `lp` (the objective in words).
θ is scaled so that its largest value is 1 (θ_i = exp(−β(γ_i − min γ))): the LP's solution is unchanged by a
common factor, and large β (OMPQ uses up to 100) no longer underflows to all-zero importances.

Features. OMPQ's code takes, per layer, the output after the layer's BatchNorm and ReLU (and for the last conv
of a residual block, the block output after the addition). With any module graph, the nearest generic
equivalent is the input of the *next* quantizable layer in execution order (`params["features"]="next_input"`,
the last layer's own output ends the list); `"output"` (default) takes each layer's own raw output, which
is well-defined for every graph (parallel branches included). See bench/sensitivity_fidelity.py for both.

Table values (the estimated loss increase per option). The LP's objective is linear in the bits; the table
needs a number per (layer, option). Two monotone mappings (`params["mapping"]`):
- `"noise"` (default): w_i × relative weight-quantization noise ‖Q_b(W_i) − W_i‖² / ‖W_i‖² with the
  project's weight quantizer (`options.quant`): importance-weighted, and it knows that some layers' weights
  quantize worse than others at the same bit-width;
- `"lp"`: w_i × (1 − min(b, 8)/8) (0 for float): a solver minimising the sum of these values under a size
  budget solves exactly OMPQ's linear program.
w is scaled to mean 1 over the layers, so the values are on the scale of the relative noise.
Activation bits are not covered (`covers_activations = False`): values do not depend on them.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from quant.allocation import LayerBits, is_float_bits
from quant.apply import DATA_CLIPS, collect_statistics, wrap_model
from quant.errors import BitsearchError

from quant.registry import check_choice, check_positive

from .base import SensitivityContext, SensitivityMethod, register_method
from .table import SensitivityTable

FEATURES = ("output", "next_input")
MAPPINGS = ("noise", "lp")
DEFAULT_BETA = 1.0


def _flat(t: Any) -> torch.Tensor | None:
    if torch.is_tensor(t):
        return t
    if isinstance(t, (tuple, list)) and t and torch.is_tensor(t[0]):
        return t[0]
    return None


def _gram(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x @ x.T


def centre_gram(k: torch.Tensor) -> torch.Tensor:
    """H K H with H = I − 11ᵀ/N (double centring of a Gram matrix)."""
    mean_rows = k.mean(0, keepdim=True)
    return k - mean_rows - mean_rows.T + k.mean()


def centred_gram(features: torch.Tensor) -> torch.Tensor:
    """H (X Xᵀ) H in float64 for an (N, d) feature matrix."""
    return centre_gram(_gram(features.reshape(features.shape[0], -1)))


@torch.no_grad()
def layer_grams(
    model: nn.Module, modules: dict[str, nn.Module], x: torch.Tensor, features: str = "output"
) -> dict[str, torch.Tensor]:
    """Per layer, the centred Gram matrix (N × N, float64) of its features on the batch `x`.

    `modules` in execution order. `features="output"`: the layer's output (a module called several times:
    its calls' features concatenated, i.e. their Grams summed); `"next_input"`: the input of the next layer
    (the last layer: its output). Grams are formed inside the hooks, so only N × N matrices are kept, never
    the features themselves.
    """
    if features not in FEATURES:
        raise BitsearchError(f"orthogonality: unknown features {features!r}; known: {list(FEATURES)}")
    n = x.shape[0]
    names = list(modules)
    out_grams: dict[str, torch.Tensor] = {}
    in_grams: dict[str, torch.Tensor] = {}
    want_out = set(names) if features == "output" else {names[-1]}
    want_in = set(names[1:]) if features == "next_input" else set()
    handles = []

    def hooks(name: str):
        def pre(module, args):
            if name in want_in and name not in in_grams and args and torch.is_tensor(args[0]):
                in_grams[name] = _gram(args[0].detach().reshape(n, -1))

        def post(module, args, output):
            t = _flat(output)
            if name in want_out and t is not None:
                k = _gram(t.detach().reshape(n, -1))
                out_grams[name] = out_grams[name] + k if name in out_grams else k

        return pre, post

    for name, m in modules.items():
        pre, post = hooks(name)
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    was = {m: m.training for m in model.modules()}
    model.eval()
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
        for m, t in was.items():
            m.training = t
    result: dict[str, torch.Tensor] = {}
    for i, name in enumerate(names):
        if features == "next_input" and i + 1 < len(names):
            k = in_grams.get(names[i + 1])
        else:
            k = out_grams.get(name)
        if k is None:
            raise BitsearchError(
                f"orthogonality: no features for layer {name!r} (it did not run on the batch)"
            )
        result[name] = centre_gram(k)
    return result


def orm_matrix(grams: list[torch.Tensor]) -> np.ndarray:
    """ORM(i, j) = ⟨K̃_i, K̃_j⟩_F / (‖K̃_i‖ ‖K̃_j‖) for centred Gram matrices (0 where a layer's features are
    constant over the batch)."""
    g = torch.stack([k.reshape(-1) for k in grams])  # (L, N²)
    norms = g.norm(dim=1)
    inner = g @ g.T
    denom = norms[:, None] * norms[None, :]
    m = torch.where(denom > 0, inner / denom.clamp(min=1e-300), torch.zeros_like(inner))
    return m.clamp(-1.0, 1.0).numpy()


def importance_from_orm(orm: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(γ, θ scaled to max 1, LP weights w_i = mean_{j≥i} θ_j) from an ORM matrix in execution order."""
    gamma = orm.sum(1) - np.diag(orm)
    theta = np.exp(-beta * (gamma - gamma.min()))
    suffix_sum = np.cumsum(theta[::-1])[::-1]
    weight = suffix_sum / np.arange(len(theta), 0, -1)
    return gamma, theta, weight


@register_method
class OrthogonalitySensitivity(SensitivityMethod):
    """OMPQ: importance from the orthogonality of layer features, one batch, no labels, no gradients."""

    name = "orthogonality"
    covers_activations = False
    needs_labels = False

    @dataclass
    class Config:
        """beta, features ("output" | "next_input"), mapping, batch (samples); see the module docstring."""

        beta: float = DEFAULT_BETA
        features: str = "output"
        mapping: str = "noise"
        batch: int | None = None

        def __post_init__(self) -> None:
            if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not self.beta >= 0:
                raise BitsearchError("beta must be a non-negative number")
            check_choice(self.features, ("output", "next_input"), "features")
            check_choice(self.mapping, list(MAPPINGS), "mapping")
            check_positive(self.batch, "batch", allow_none=True, integer=True)

    def compute(self, ctx: SensitivityContext) -> SensitivityTable:
        t0 = time.perf_counter()
        params = dict(ctx.options.params)
        beta = float(params.get("beta", DEFAULT_BETA))
        if not math.isfinite(beta) or beta < 0:
            raise BitsearchError("orthogonality: beta must be a non-negative number")
        features = params.get("features", "output")
        mapping = params.get("mapping", "noise")
        if mapping not in MAPPINGS:
            raise BitsearchError(f"orthogonality: unknown mapping {mapping!r}; known: {list(MAPPINGS)}")
        batch = int(params.get("batch", ctx.x.shape[0]))
        if batch < 2:
            raise BitsearchError("orthogonality: the batch needs at least 2 samples")
        x = ctx.x[:batch]
        names = [info.name for info in ctx.layers]
        if len(names) < 2:
            raise BitsearchError("orthogonality needs at least two quantizable layers")

        modules = ctx.modules()
        grams_by_name = layer_grams(ctx.model, {n: modules[n] for n in names}, x, features)
        grams = [grams_by_name.pop(n) for n in names]
        orm = orm_matrix(grams)
        del grams
        gamma, theta, weight = importance_from_orm(orm, beta)
        w = weight / weight.mean()

        options: list[LayerBits] = ctx.options.options
        noise, stats_pass = self._weight_noise(ctx, x, names, options)
        ctx.progress(1.0, "orthogonality importance ready")
        if mapping == "noise":
            values = w[:, None] * noise
        else:
            frac = np.array(
                [0.0 if is_float_bits(o.weight_bits) else 1.0 - min(o.weight_bits, 8) / 8 for o in options]
            )
            values = w[:, None] * frac[None, :]

        return SensitivityTable(
            method=self.name,
            layers=list(ctx.layers),
            options=options,
            values=values,
            stderr=None,
            covers_activations=False,
            settings={
                "beta": beta,
                "features": features,
                "mapping": mapping,
                "batch": int(x.shape[0]),
                "definition": (
                    "w_i * ||Q_b(W_i) - W_i||^2 / ||W_i||^2"
                    if mapping == "noise"
                    else "w_i * (1 - min(b, 8) / 8)"
                )
                + " with w_i = mean_{j>=i} theta_j (OMPQ's LP weight, scaled to mean 1), "
                "theta_j = exp(-beta * (gamma_j - min gamma)), gamma_j = sum_{k!=j} ORM(j, k)",
            },
            cost={
                "passes": (1.0 + stats_pass) * float(x.shape[0]) / float(ctx.x.shape[0]),
                "seconds": time.perf_counter() - t0,
            },
            extra={
                "orthogonality_importance": theta.tolist(),
                "orthogonality_gamma": gamma.tolist(),
                "orthogonality_matrix": orm.tolist(),
                "lp_weight": weight.tolist(),
                "beta": beta,
                "relative_weight_noise": noise.tolist(),
                "lp": "maximise sum_i lp_weight[i] * bits[i] subject to sum_i params[i] * bits[i] <= budget "
                "(layers in execution order)",
            },
        )

    @staticmethod
    def _weight_noise(ctx: SensitivityContext, x: torch.Tensor, names: list[str], options: list[LayerBits]):
        """‖Q(W) − W‖² / ‖W‖² per layer and option, with the project's quantizers (weights only), and
        whether a calibration pass was needed (data-driven weight clipping or bias correction)."""
        config = ctx.options.quant
        qmodel = copy.deepcopy(ctx.model).eval()
        wrappers = wrap_model(qmodel, config)
        stats_pass = config.weight_clip in DATA_CLIPS or config.bias_correction
        if stats_pass:
            collect_statistics(qmodel, wrappers, x, config)
        out = np.zeros((len(names), len(options)))
        cache: dict[tuple[str, LayerBits], float] = {}
        for i, name in enumerate(names):
            q = wrappers[name]
            w = q.layer.weight.detach()
            denom = float(w.double().pow(2).sum()) or 1.0
            for j, opt in enumerate(options):
                key = (name, LayerBits(opt.weight_bits, 32, opt.weight_quantizer))
                if key not in cache:
                    q.set_bits(key[1])
                    with torch.no_grad():
                        cache[key] = float((q.quantized_weight().double() - w.double()).pow(2).sum()) / denom
                out[i, j] = cache[key]
        return out, float(stats_pass)
