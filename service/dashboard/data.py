"""What the dashboard's charts and tables show, assembled from the REST API's own response bodies.

Everything here takes the schemas the API returns (`ParetoOut`, `SearchOut`, `JobOut`) or the stored JSON
(sensitivity table, allocation), so a figure on a page is the figure the API serves. Hover texts are made
here with `search.problem.format_value`, the same formatting the CLI prints.
"""

from __future__ import annotations

import math
from html import escape  # hover texts are Plotly's pseudo-HTML
from typing import Any, Iterable

from quant.errors import BitsearchError
from search.problem import format_value
from service.api.schemas import BudgetIn, JobOut, ParetoOut, PointOut, SearchOut

# The cost metrics the front can be plotted against: key -> (axis title, factor from internal units).
X_METRICS: dict[str, tuple[str, float]] = {
    "weight_memory": ("weight memory (KiB)", 1 / 8 / 1024),
    "avg_weight_bits": ("average weight bits", 1.0),
    "bops": ("BOPs", 1.0),
    "latency": ("latency (ms)", 1e3),
}
ACTIVE = ("queued", "running")


def _finite(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _accuracy(measured: dict[str, Any] | None, key: str) -> float | None:
    return _finite((measured or {}).get(key))


def _point_hover(p: PointOut, accuracy_key: str, kind: str) -> str:
    metrics = getattr(p, "metrics", None) or {}
    measured = getattr(p, "measured", None) or {}
    lines = [f"<b>{escape(p.label)}</b> ({kind}, point {p.index}{', recommended' if p.recommended else ''})"]
    for key in X_METRICS:
        v = _finite(metrics.get(key))
        if v is not None:
            lines.append(f"{key.replace('_', ' ')}: {format_value(key, v)}")
    if p.predicted is not None:
        lines.append(f"predicted loss increase: {p.predicted:.4g}")
    acc = _accuracy(measured, accuracy_key)
    if acc is not None:
        lines.append(f"measured {accuracy_key}: {acc:.2f} %")
    return "<br>".join(lines)


def _x_values(metrics: dict[str, Any]) -> dict[str, float | None]:
    out = {}
    for key, (_, factor) in X_METRICS.items():
        v = _finite(metrics.get(key))
        out[key] = None if v is None else v * factor
    return out


def front_data(pareto: ParetoOut | None, finetunes: Iterable[tuple[int | None, JobOut]]) -> dict[str, Any]:
    """The Pareto chart's series: mixed-precision points, uniform baselines and fine-tuned (QAT) results,
    each point with its cost on every metric (display units), predicted loss, measured accuracy and hover."""
    points = list(pareto.points) if pareto else []
    uniform = list(pareto.uniform) if pareto else []
    everything = points + uniform
    # top-1 when the data have labels, else agreement with the float model
    accuracy_key = "top1"
    if everything and all(_accuracy(getattr(p, "measured", None), "top1") is None for p in everything):
        accuracy_key = "agreement"

    def row(p: PointOut, kind: str) -> dict[str, Any]:
        return {
            "index": p.index,
            "label": p.label,
            "x": _x_values(getattr(p, "metrics", None) or {}),
            "predicted": _finite(p.predicted),
            "accuracy": _accuracy(getattr(p, "measured", None), accuracy_key),
            "recommended": p.recommended,
            "hover": _point_hover(p, accuracy_key, kind),
        }

    by_index = {p.index: p for p in everything}
    qat = []
    for point, job in finetunes:
        p = by_index.get(point) if point is not None else None
        metrics = ((job.result or {}).get("metrics") or {}) if job.status == "succeeded" else {}
        acc = _accuracy(metrics, accuracy_key)
        if p is None or acc is None:
            continue
        before = _accuracy(getattr(p, "measured", None), accuracy_key)
        steps = (job.result or {}).get("steps")
        qat.append(
            {
                "index": p.index,
                "label": f"QAT of {p.label}",
                "x": _x_values(getattr(p, "metrics", None) or {}),
                "predicted": None,
                "accuracy": acc,
                "recommended": False,
                "job_id": job.id,
                "hover": "<br>".join(
                    [f"<b>QAT of {escape(p.label)}</b> (point {p.index}, job {job.id[:8]})"]
                    + [f"{accuracy_key} after fine-tuning: {acc:.2f} %"]
                    + ([f"{accuracy_key} before (PTQ): {before:.2f} %"] if before is not None else [])
                    + ([f"steps: {steps}"] if steps is not None else [])
                ),
            }
        )
    available = [
        {"key": k, "title": title}
        for k, (title, _) in X_METRICS.items()
        if any(_finite((getattr(p, "metrics", None) or {}).get(k)) is not None for p in everything)
    ] or [{"key": "avg_weight_bits", "title": X_METRICS["avg_weight_bits"][0]}]
    return {
        "status": pareto.status if pareto else None,
        "x_metrics": available,
        "default_x": (pareto.front.get("metric") if pareto else None) or "avg_weight_bits",
        "accuracy_key": accuracy_key,
        "series": {
            "mixed": [row(p, "mixed precision") for p in points],
            "uniform": [row(p, "uniform") for p in uniform],
            "qat": qat,
        },
    }


def heatmap_data(table: dict[str, Any] | None) -> dict[str, Any] | None:
    """Layers × bit options of a stored sensitivity table (`bitsearch.sensitivity` JSON)."""
    if not table or not table.get("layers") or not table.get("options"):
        return None
    from quant.allocation import LayerBits

    options = []
    for o in table["options"]:
        try:
            options.append(LayerBits.from_dict(o).label())
        except (BitsearchError, TypeError, KeyError, ValueError):
            options.append(str(o))
    return {
        "method": table.get("method"),
        "layers": [str(l.get("name")) for l in table["layers"]],
        "options": options,
        "values": [[_finite(v) for v in row] for row in table.get("values") or []],
    }


def layer_costs(
    allocation: dict[str, Any], table: dict[str, Any] | None, request: dict[str, Any]
) -> dict[str, Any]:
    """Per-layer bits of an allocation and each layer's share of every cost metric (shares need the layer
    shapes, which the stored sensitivity table carries; without it only the bits are known)."""
    from quant.allocation import Allocation

    alloc = Allocation.from_dict(allocation)
    names = list(alloc.layers)
    shares: dict[str, dict[str, float]] = {}
    if table and table.get("layers"):
        from quant.cost import CostModel
        from quant.layers import LayerInfo

        try:
            layers = [LayerInfo.from_dict(l) for l in table["layers"]]
            granularity = (request.get("quant") or {}).get("weight_granularity", "per_channel")
            cost = CostModel(layers, request.get("latency_table"), weight_granularity=granularity)
            names = [n for n in cost.layer_names if n in alloc.layers] + [
                n for n in names if n not in cost.layer_names
            ]
            per_layer = {n: cost.layer_metrics(n, alloc[n]) for n in names if n in cost.layer_names}
            for metric in X_METRICS:
                total = sum(m.get(metric, 0.0) for m in per_layer.values())
                if total > 0 and all(metric in m for m in per_layer.values()):
                    shares[metric] = {n: m[metric] / total for n, m in per_layer.items()}
        except (BitsearchError, TypeError, KeyError, ValueError):
            shares = {}  # a table that no longer matches the allocation: show the bits alone
    return {
        "layers": [
            {
                "name": n,
                "weight_bits": alloc[n].weight_bits,
                "activation_bits": alloc[n].activation_bits,
                "label": alloc[n].label(),
                "share": {metric: s.get(n) for metric, s in shares.items()},
            }
            for n in names
        ],
        "share_metrics": list(shares),
        "metadata": allocation.get("metadata") or {},
    }


def budgets_text(request: dict[str, Any]) -> str:
    parts = []
    for b in request.get("budgets") or []:
        try:
            limit = format_value(b["metric"], BudgetIn(**b).limit())
            parts.append(f"{b['metric'].replace('_', ' ')} ≤ {limit}")
        except (ValueError, TypeError, KeyError):
            parts.append(f"{b.get('metric')} ≤ {b.get('value')}")
    return ", ".join(parts) or "none (front only)"


def best_recommendation(search: SearchOut) -> str:
    """The recommendation at the requested budgets (else the last of the sweep), in a few words. The summary
    is what `service.api.search_job.outcome_rows` stores from a `SearchResult`."""
    recs = (search.summary or {}).get("recommendations") or []
    if not recs:
        return ""
    chosen = next((r for r in recs if r["requested"]), recs[-1])
    point = chosen["point"]
    metrics, measured = point["metrics"], point["measured"]
    words = [str(point["label"] or point["kind"])]
    if _finite(metrics.get("avg_weight_bits")) is not None:
        words.append(format_value("avg_weight_bits", metrics["avg_weight_bits"]))
    if _finite(measured.get("top1")) is not None:
        words.append(f"top-1 {measured['top1']:.2f} %")
    elif _finite(measured.get("agreement")) is not None:
        words.append(f"agreement {measured['agreement']:.2f} %")
    return " · ".join(words)
