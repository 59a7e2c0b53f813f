"""A search whose measured front is timed end to end in ONNX Runtime (`SearchSpec.measure_latency`).

The digits CNN: every layer profiled in ONNX Runtime (`profile_layers`, options 4/8, 8/8, fp), that table
given to the search as its latency table, a latency budget of uniform W8A8's predicted latency,
and each front point (mixed and uniform) exported as ONNX QDQ and timed whole: predicted (sum of the layer
table) against measured end-to-end latency.

    .venv/bin/python bench/front_latency.py          # prints a markdown table
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import onnxruntime  # noqa: E402

from bitsearch.pipeline import run_search  # noqa: E402
from bitsearch.spec import SearchSpec  # noqa: E402
from quant import Allocation, LayerBits  # noqa: E402
from quant.cost import CostModel  # noqa: E402
from quant.layers import discover_layers  # noqa: E402
from quant.profile import profile_layers  # noqa: E402
from zoo import load_model  # noqa: E402


def main() -> None:
    loaded = load_model("zoo:digits-cnn")
    prof = profile_layers(loaded.model, loaded.example_input, ("fp", "8/8", "4/8"), batch_size=1,
                          warmup=5, repeats=30)
    table = prof.table()
    infos = discover_layers(loaded.model, loaded.example_input)
    w8a8 = CostModel(infos, latency_table=table).cost(
        Allocation({i.name: LayerBits(8, 8) for i in infos})).latency_s
    # W4A8 is not faster than W8A8 per layer in ONNX Runtime CPU (QDQ int4), so 'W8A8 minus 20 %' has no
    # solution on this model: the budget is uniform W8A8's predicted latency.
    budget = w8a8
    spec = SearchSpec.parse({
        "model": "zoo:digits-cnn", "data": "zoo:digits", "latency_table": table,
        "budgets": [{"metric": "latency", "value": budget}], "pareto_points": 4, "calib_size": 128,
        "refine": False, "options": {"weight_bits": [4, 8], "activation_bits": [8], "keep_first_last": False},
        "sensitivity": {"method": "hessian", "samples": 64},
        "measure_latency": {"enabled": True, "batch_size": 1, "warmup": 10, "repeats": 100},
    })
    result = run_search(spec)
    print(f"ONNX Runtime {onnxruntime.__version__}, CPU, batch 1; budget {budget * 1e3:.4f} ms "
          f"(uniform W8A8 predicted)\n")
    print("| point | kind | predicted (ms) | measured median (ms) [p25, p75] | error % |")
    print("|---|---|---|---|---|")
    for i, p in enumerate(list(result.front.points) + list(result.front.uniform)):
        pred, m = p.metrics.get("latency"), p.measured
        err = 100.0 * (pred - m["latency_s"]) / m["latency_s"]
        print(f"| {i} | {p.kind} {p.label or ''} | {pred * 1e3:.4f} | {m['latency_s'] * 1e3:.4f} "
              f"[{m['latency_p25_s'] * 1e3:.4f}, {m['latency_p75_s'] * 1e3:.4f}] | {err:+.0f} |")


if __name__ == "__main__":
    main()
