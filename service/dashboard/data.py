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
from service.api.schemas import BitsHistoryOut, BudgetIn, JobOut, ParetoOut, PointOut, SearchOut, TrialsOut

# The cost metrics the front can be plotted against: key -> (axis title, factor from internal units).
X_METRICS: dict[str, tuple[str, float]] = {
    "weight_memory": ("weight memory (KiB)", 1 / 8 / 1024),
    "avg_weight_bits": ("average weight bits", 1.0),
    "bpw": ("bits per weight (with scales)", 1.0),
    "bops": ("BOPs", 1.0),
    "latency": ("predicted latency (sum of per-layer table) (ms)", 1e3),
    "latency_measured": ("measured end-to-end latency (ms)", 1e3),
}
ACTIVE = ("queued", "running")
#: Where a point carries a measured end-to-end latency (median seconds of the whole exported model, as
#: `quant.profile.measure_end_to_end` times it): `point.measured["latency_s"]`. Without it the latency axis
#: is the table's prediction alone.
MEASURED_LATENCY = "latency_s"


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
        if v is not None and key != "latency":
            lines.append(f"{key.replace('_', ' ')}: {format_value(key, v)}")
    predicted_s, measured_s = _finite(metrics.get("latency")), _finite(measured.get(MEASURED_LATENCY))
    if predicted_s is not None and measured_s is not None and measured_s > 0:
        error = 100.0 * (predicted_s - measured_s) / measured_s
        lines.append(
            f"latency: predicted {1e3 * predicted_s:.4g} ms (sum of per-layer table), "
            f"measured {1e3 * measured_s:.4g} ms end to end ({error:+.1f} %)"
        )
    elif predicted_s is not None:
        lines.append(f"predicted latency (sum of per-layer table): {1e3 * predicted_s:.4g} ms")
    if p.predicted is not None:
        lines.append(f"predicted loss increase: {p.predicted:.4g}")
    acc = _accuracy(measured, accuracy_key)
    intervals = getattr(p, "intervals", None) or {}

    def ci(role: str) -> str:
        lo_hi = (intervals.get(role) or {}).get(accuracy_key)
        return f" [{lo_hi[0]:.2f}, {lo_hi[1]:.2f}]" if lo_hi else ""

    if acc is not None:
        lines.append(f"measured {accuracy_key}: {acc:.2f} %{ci('selection')} (selection data)")
    rep = _accuracy(getattr(p, "report", None), accuracy_key)
    if rep is not None:
        lines.append(f"{accuracy_key} on the report data: {rep:.2f} %{ci('report')}")
    return "<br>".join(lines)


def _x_values(p: PointOut) -> dict[str, float | None]:
    metrics = getattr(p, "metrics", None) or {}
    measured_s = _finite((getattr(p, "measured", None) or {}).get(MEASURED_LATENCY))
    out = {}
    for key, (_, factor) in X_METRICS.items():
        v = measured_s if key == "latency_measured" else _finite(metrics.get(key))
        out[key] = None if v is None else v * factor
    return out


def _error_bar(p: PointOut, accuracy_key: str, accuracy: float | None) -> list[float] | None:
    """[below, above] the measured accuracy: its interval on the selection data (asymmetric), or None."""
    lo_hi = ((getattr(p, "intervals", None) or {}).get("selection") or {}).get(accuracy_key)
    if accuracy is None or not isinstance(lo_hi, (list, tuple)) or len(lo_hi) != 2:
        return None
    lo, hi = _finite(lo_hi[0]), _finite(lo_hi[1])
    if lo is None or hi is None:
        return None
    return [max(accuracy - lo, 0.0), max(hi - accuracy, 0.0)]


def _test(d: Any) -> dict[str, Any] | None:
    """A paired test of `search.selection` (contender − baseline) as the details panel shows it."""
    if not isinstance(d, dict) or _finite(d.get("delta")) is None:
        return None
    ci = d.get("ci") or [None, None]
    return {
        "delta": float(d["delta"]),
        "ci": [_finite(ci[0]), _finite(ci[1])] if len(ci) == 2 else [None, None],
        "n": d.get("n"),
        "significant": d.get("significant"),
        "p_value": _finite(d.get("p_value")),
        "confidence": _finite(d.get("confidence")),
    }


def _evidence(recommendations: Iterable[Any]) -> dict[int, list[dict[str, Any]]]:
    """Point index -> the evidence of each recommendation that chose it (the stored summary's
    `recommendations`, whose `evidence` is `search.selection.Evidence.to_dict`)."""
    out: dict[int, list[dict[str, Any]]] = {}
    for r in recommendations or []:
        if not isinstance(r, dict) or not isinstance(r.get("index"), int):
            continue
        ev = r.get("evidence") or {}
        budgets = []
        for b in r.get("budgets") or []:
            try:
                budgets.append(f"{b['metric'].replace('_', ' ')} ≤ {format_value(b['metric'], float(b['limit']))}")
            except (KeyError, TypeError, ValueError):
                budgets.append(str(b))
        out.setdefault(r["index"], []).append(
            {
                "budgets": budgets,
                "requested": bool(r.get("requested")),
                "recommended": ev.get("recommended"),
                "reason": ev.get("reason"),
                "ranking": ev.get("ranking"),
                "baseline": ev.get("baseline"),
                "contender": (ev.get("contender") or {}).get("label") if isinstance(ev.get("contender"), dict) else None,
                "selection": _test(ev.get("selection")),
                "report": _test(ev.get("report")),
            }
        )
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

    evidence = _evidence(pareto.recommendations if pareto else [])

    def row(p: PointOut, kind: str) -> dict[str, Any]:
        accuracy = _accuracy(getattr(p, "measured", None), accuracy_key)
        return {
            "index": p.index,
            "label": p.label,
            "x": _x_values(p),
            "predicted": _finite(p.predicted),
            "accuracy": accuracy,
            "error": _error_bar(p, accuracy_key, accuracy),
            "recommended": p.recommended,
            "evidence": evidence.get(p.index, []),
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
                "x": _x_values(p),
                "predicted": None,
                "accuracy": acc,
                "error": None,
                "recommended": False,
                "evidence": [],
                "job_id": job.id,
                "hover": "<br>".join(
                    [f"<b>QAT of {escape(p.label)}</b> (point {p.index}, job {job.id[:8]})"]
                    + [f"{accuracy_key} after fine-tuning: {acc:.2f} %"]
                    + ([f"{accuracy_key} before (PTQ): {before:.2f} %"] if before is not None else [])
                    + ([f"steps: {steps}"] if steps is not None else [])
                ),
            }
        )
    xs = [_x_values(p) for p in everything]
    available = [
        {"key": k, "title": title}
        for k, (title, _) in X_METRICS.items()
        if any(x[k] is not None for x in xs)
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


HOVER_BITS = 12  # layers listed in a trial's hover; the rest are counted


def _trial_hover(t: Any, score_name: str, cost_metric: str | None) -> str:
    flags = [w for w, on in (("Pareto-optimal", t.pareto), ("warm start: the ILP's answer or a uniform "
                                                              "baseline", t.warm_start)) if on]
    lines = [f"<b>trial {t.number}</b>" + (f" ({', '.join(flags)})" if flags else "")]
    if t.score is not None:
        lines.append(f"{escape(score_name)}: {t.score:.4g}")
    for key in X_METRICS:
        v = _finite(t.metrics.get(key))
        if v is not None:
            mark = " (study's cost)" if key == cost_metric else ""
            lines.append(f"{key.replace('_', ' ')}: {format_value(key, v)}{mark}")
    if t.arch:
        lines.append("architecture: " + escape(", ".join(f"{k} {v}" for k, v in t.arch.items())))
    if t.bits:
        items = [f"{escape(n)} {escape(b)}" for n, b in t.bits.items()]
        more = f", … {len(items) - HOVER_BITS} more" if len(items) > HOVER_BITS else ""
        lines.append("bits: " + ", ".join(items[:HOVER_BITS]) + more)
    if t.retry_of is not None:
        lines.append(f"re-run of trial {t.retry_of} (its worker was lost)")
    if t.seconds is not None:
        lines.append(f"ran {t.seconds:.1f} s")
    return "<br>".join(lines)


def trials_data(trials: TrialsOut | None) -> dict[str, Any] | None:
    """The trial scatter: each measured trial's score, its cost on every metric (display units) and hover;
    trials without a score (over budget, failed, pruned, unfinished) are counted, not drawn."""
    if trials is None:
        return None
    score_name = {"top1": "selection top-1 (%)", "agreement": "selection agreement (%)"}.get(
        trials.score_name, f"selection {trials.score_name}")
    rows = []
    for t in trials.trials:
        if t.score is None:
            continue
        x = {}
        for key, (_, factor) in X_METRICS.items():
            v = _finite(t.metrics.get(key))
            if v is not None:
                x[key] = v * factor
        rows.append({"number": t.number, "score": t.score, "pareto": t.pareto, "x": x,
                     "hover": _trial_hover(t, score_name, trials.cost_metric)})
    available = [{"key": k, "title": title} for k, (title, _) in X_METRICS.items() if any(k in r["x"] for r in rows)]
    default_x = trials.cost_metric if any(m["key"] == trials.cost_metric for m in available) else (
        available[0]["key"] if available else None)
    return {
        "solver": trials.solver,
        "exists": trials.exists,
        "direction": trials.direction,
        "score_title": score_name,
        "cost_metric": trials.cost_metric,
        "x_metrics": available,
        "default_x": default_x,
        "progress": trials.progress.model_dump(),
        "pareto_count": sum(1 for r in rows if r["pareto"]),
        "points": rows,
    }


def bits_history_data(history: BitsHistoryOut | None) -> dict[str, Any] | None:
    """QBitOpt's layers × re-allocation steps, weight bits as the colour, the full option label on hover."""
    if history is None or not history.steps:
        return None
    changed = [set(c) for c in history.changed]
    return {
        "source": history.source,
        "steps": history.steps,
        "layers": [l.name for l in history.layers],
        "bits": [l.weight_bits for l in history.layers],
        "labels": [
            [f"{lab}{' (changed here)' if l.name in changed[i] else ''}" for i, lab in enumerate(l.labels)]
            for l in history.layers
        ],
        "changes": sum(len(c) for c in changed),
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
    d = (chosen.get("evidence") or {}).get("report")
    if d and _finite(d.get("delta")) is not None:
        baseline = chosen["evidence"].get("baseline")
        words.append(f"mixed − {baseline} on report {d['delta']:+.2f} [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}]")
    return " · ".join(words)
