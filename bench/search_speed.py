"""Solver speed on a synthetic 1,000-layer problem: 6 options per layer, two budgets at once.

    .venv/bin/python bench/search_speed.py [--layers 1000] [--points 100] [--ilp-points 3]

The problem: random conv layers (16–256 channels, 3×3, 4×4–32×32 maps); options W2A8, W3A8, W4A4, W4A8, W6A8,
W8A8; a synthetic sensitivity s_l·(4^-w + 0.3·4^-a) with log-normal layer scales s_l. The sweep is a
100-point Pareto front of avg_weight_bits with a fixed BOPs budget (40 % of W8A8's) in force at every point,
so each point is a two-budget problem.

Timed: the knapsack solver's whole front (range, 100 points, de-duplication, uniform baselines) and its
sweep alone; the ilp solver per point on a few points of the same sweep (CBC through PuLP, and SciPy's
HiGHS), with the knapsack's distance to the ilp optimum; the lp solver per point. Writes the table, the
command and the machine to bench/results/search_speed.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quant.allocation import LayerBits  # noqa: E402
from quant.cost import CostModel  # noqa: E402
from quant.layers import LayerInfo  # noqa: E402
from search import AllocationProblem, get_solver, pareto_front  # noqa: E402
from sensitivity.table import SensitivityTable  # noqa: E402

OPTIONS = [
    LayerBits(2, 8),
    LayerBits(3, 8),
    LayerBits(4, 4),
    LayerBits(4, 8),
    LayerBits(6, 8),
    LayerBits(8, 8),
]


def synthetic_problem(n_layers: int = 1000, seed: int = 0, bops_fraction: float = 0.4) -> AllocationProblem:
    rng = np.random.default_rng(seed)
    layers = []
    for i in range(n_layers):
        cin, cout = (int(c) for c in rng.choice([16, 32, 64, 128, 256], 2))
        hw = int(rng.choice([4, 8, 16, 32]))
        params = cin * cout * 9
        layers.append(
            LayerInfo(
                name=f"layer{i}",
                kind="Conv2d",
                weight_shape=(cout, cin, 3, 3),
                params=params,
                bias=False,
                macs=params * hw * hw,
                input_shape=(cin, hw, hw),
                output_shape=(cout, hw, hw),
                out_channels=cout,
            )
        )
    w = np.array([o.weight_bits for o in OPTIONS], dtype=float)
    a = np.array([o.activation_bits for o in OPTIONS], dtype=float)
    scale = rng.lognormal(0.0, 1.5, size=(n_layers, 1))
    values = scale * (4.0**-w + 0.3 * 4.0**-a)[None, :] * (1 + 0.1 * rng.random((n_layers, len(OPTIONS))))
    table = SensitivityTable("synthetic", layers, OPTIONS, values)
    cost = CostModel(layers)
    bops_limit = bops_fraction * cost.uniform(LayerBits(8, 8)).bops
    return AllocationProblem(table, cost, [f"bops={bops_limit:.6e}"])


def timed(fn):
    """(result, wall seconds, CPU seconds of this process). On a shared machine the CPU time is the fairer
    figure: the wall time also counts the time other jobs held the cores."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ""
    if hasattr(os, "getloadavg"):
        load = ", load average %.1f at the start" % os.getloadavg()[0]
    return (
        f"{os.cpu_count()}-core CPU ({cpu}), Python {platform.python_version()}, numpy {np.__version__}{load}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=1000)
    ap.add_argument("--points", type=int, default=100)
    ap.add_argument("--ilp-points", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "search_speed.md"))
    args = ap.parse_args()

    started = machine()
    problem, build_s, _ = timed(lambda: synthetic_problem(args.layers))
    print(f"problem: {problem.describe()} (built in {build_s:.2f} s)")

    # The whole knapsack front, then the bare sweep on the same budgets (the front's range computation,
    # de-duplication and uniform baselines excluded).
    front, front_s, front_cpu = timed(
        lambda: pareto_front(problem, "avg_weight_bits", n_points=args.points, solver="knapsack")
    )
    base = problem.without_budget("avg_weight_bits")
    lo = min(p.metrics["avg_weight_bits"] for p in front.points)
    hi = max(p.metrics["avg_weight_bits"] for p in front.points)
    limits = list(np.linspace(lo, hi, args.points))
    knap = get_solver("knapsack")
    sols, sweep_s, sweep_cpu = timed(lambda: knap.sweep(base, "avg_weight_bits", limits))
    found = [s for s in sols if s is not None]
    rel_gaps = [s.gap / abs(s.objective) for s in found if s.gap is not None and s.objective]
    print(
        f"knapsack: front {front_s:.2f} s wall / {front_cpu:.2f} s CPU ({len(front.points)} points kept), "
        f"sweep {sweep_s:.2f} s wall / {sweep_cpu:.2f} s CPU"
    )

    # A few points of the same sweep with the exact solvers, and the knapsack's distance to them.
    picks = [
        limits[i] for i in np.linspace(0, len(limits) - 1, args.ilp_points + 2).round().astype(int)[1:-1]
    ]
    rows = []
    exact: dict[float, float] = {}
    for backend in ("cbc", "scipy"):
        ilp = get_solver("ilp", backend=backend, time_limit=120)
        secs, cpus, diffs, optimal = [], [], [], 0
        for lim in picks:
            p = base.with_budget("avg_weight_bits", lim)
            s, t, c = timed(lambda ilp=ilp, p=p: ilp.solve(p))
            cpus.append(c)
            k = knap.solve(p)
            secs.append(t)
            optimal += int(s.optimal)
            exact[lim] = min(exact.get(lim, np.inf), s.objective)
            diffs.append((k.objective - s.objective) / abs(s.objective))
            print(
                f"ilp[{backend}] avg_wbits<={lim:.3f}: {t:.2f} s, optimal={s.optimal}, "
                f"knapsack rel. excess {diffs[-1]:.2e}"
            )
        rows.append((backend, secs, cpus, diffs, optimal))
    lp = get_solver("lp")
    lp_secs, lp_cpus, lp_excess = [], [], []
    for lim in picks:
        p = base.with_budget("avg_weight_bits", lim)
        s, t, c = timed(lambda p=p: lp.solve(p))
        lp_secs.append(t)
        lp_cpus.append(c)
        lp_excess.append(s.objective)

    def row(*cells: object) -> str:
        return "| " + " | ".join(str(c) for c in cells) + " |"

    n = args.points
    gap_max = max(rel_gaps, default=0.0)
    gap_med = float(np.median(rel_gaps)) if rel_gaps else 0.0
    table = [
        row("solver", "what is timed", "wall s", "CPU s", "per point (wall)", "quality"),
        row("---", "---", "---:", "---:", "---:", "---"),
        row(
            "knapsack",
            f"whole front: range, {n} budgets, de-dup, uniform baselines",
            f"{front_s:.2f}",
            f"{front_cpu:.2f}",
            f"{front_s / n * 1e3:.1f} ms",
            f"{len(front.points)} distinct non-dominated points",
        ),
        row(
            "knapsack",
            f"the {n}-budget sweep alone",
            f"{sweep_s:.2f}",
            f"{sweep_cpu:.2f}",
            f"{sweep_s / n * 1e3:.1f} ms",
            f"proven gap ≤ {gap_max:.1e} of the objective (median {gap_med:.1e})",
        ),
    ]
    for backend, secs, cpus, diffs, optimal in rows:
        name = "CBC via PuLP" if backend == "cbc" else "HiGHS via scipy.optimize.milp"
        table.append(
            row(
                f"ilp ({name}, gap_rel 1e-6)",
                f"{len(picks)} points of the sweep",
                f"{sum(secs):.2f}",
                f"{sum(cpus):.2f}",
                f"{np.mean(secs):.2f} s (max {max(secs):.2f})",
                f"{optimal}/{len(picks)} optimal; "
                f"knapsack's excess over it {max(diffs):.1e} relative at most",
            )
        )
    lp_values = ", ".join(f"{v:.3g}" for v in lp_excess)
    ilp_values = ", ".join(f"{exact[lim]:.3g}" for lim in picks)
    table.append(
        row(
            "lp (OMPQ proxy, derived importance)",
            f"{len(picks)} points",
            f"{sum(lp_secs):.2f}",
            f"{sum(lp_cpus):.2f}",
            f"{np.mean(lp_secs):.2f} s",
            f"optimises its own proxy, not the table: predicted loss {lp_values} vs ilp's {ilp_values}",
        )
    )
    md = "\n".join(table)
    print()
    print(md)
    cmd = ".venv/bin/python bench/search_speed.py " + " ".join(sys.argv[1:])
    text = "\n".join(
        [
            "# Search speed: synthetic 1,000-layer problem, two budgets",
            "",
            f"Command: `{cmd.strip()}` (from the repository root)  ",
            f"Machine: {started}.  ",
            f"Problem: {problem.describe()}; sweep of avg_weight_bits over [{lo:.3f}, {hi:.3f}] with the "
            "BOPs budget fixed (every point is a two-budget problem).",
            "",
            md,
            "",
            "The knapsack's gap is its own certificate (objective minus the Lagrangian bound), not a "
            "comparison. CBC runs as a subprocess, so its CPU time is not in the CPU column (only PuLP's "
            "model building and file exchange are). Wall times were taken on a shared machine with other "
            "jobs running; the CPU column is the time this process computed.",
            "",
        ]
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
