// A search's page: the Pareto front (cost on x, measured accuracy and predicted loss on y), the allocation
// of a clicked point with its per-layer bits and cost shares, fine-tuning, the sensitivity heatmap, the
// trial scatter of a bayes or bomp-nas search, QBitOpt's bits over training, and live updates of the
// status, jobs and trials while anything runs.
"use strict";

(() => {
  const payload = JSON.parse(document.getElementById("search-data").textContent);
  const searchId = payload.search_id;
  const frontEl = document.getElementById("front-chart");
  const allocEl = document.getElementById("alloc-chart");
  const heatEl = document.getElementById("heatmap");
  const xSelect = document.getElementById("x-metric");
  const finetuneForm = document.getElementById("finetune-form");
  const COLORS = { mixed: "#2563eb", uniform: "#d97706", qat: "#16a34a", selected: "#dc2626", act: "#93c5fd" };
  const CONFIG = { responsive: true, displaylogo: false, modeBarButtonsToRemove: ["select2d", "lasso2d", "autoScale2d"] };
  const SHARE_TITLES = { weight_memory: "weight memory", avg_weight_bits: "average bits", bops: "BOPs", latency: "latency" };

  let front = payload.front;
  let xKey = null;
  let selected = null; // index of the point whose allocation is shown
  let allocation = null; // its per-layer data

  const allPoints = () => [...front.series.mixed, ...front.series.uniform];

  function fillXSelect() {
    const keys = front.x_metrics.map((m) => m.key);
    if (!keys.includes(xKey)) xKey = keys.includes(front.default_x) ? front.default_x : keys[0];
    xSelect.replaceChildren(
      ...front.x_metrics.map((m) => {
        const option = document.createElement("option");
        option.value = m.key;
        option.textContent = m.title;
        option.selected = m.key === xKey;
        return option;
      }),
    );
  }

  function series(points, name, kind, yaxis, yOf, marker, mode) {
    const shown = points.filter((p) => p.x[xKey] != null && yOf(p) != null).sort((a, b) => a.x[xKey] - b.x[xKey]);
    // the measured accuracy's confidence interval on the selection data, as asymmetric error bars
    const bars = yaxis === "y" && shown.some((p) => p.error);
    return {
      type: "scatter",
      mode,
      name,
      legendgroup: kind,
      showlegend: yaxis === "y",
      x: shown.map((p) => p.x[xKey]),
      y: shown.map(yOf),
      customdata: shown.map((p) => p.index),
      hovertext: shown.map((p) => p.hover),
      hoverinfo: "text",
      marker: {
        ...marker,
        line: { width: shown.map((p) => (p.recommended ? 2 : 0)), color: "#111827" },
      },
      line: { color: marker.color, width: 1.5 },
      error_y: bars
        ? {
            type: "data", symmetric: false, visible: true, thickness: 1.2, width: 3, color: marker.color,
            array: shown.map((p) => (p.error ? p.error[1] : null)),
            arrayminus: shown.map((p) => (p.error ? p.error[0] : null)),
          }
        : undefined,
      xaxis: "x",
      yaxis,
      meta: kind,
    };
  }

  function frontTraces() {
    const s = front.series;
    const acc = (p) => p.accuracy;
    const pred = (p) => p.predicted;
    const traces = [
      series(s.mixed, "mixed precision", "mixed", "y", acc, { color: COLORS.mixed, size: 7 }, "lines+markers"),
      series(s.uniform, "uniform", "uniform", "y", acc, { color: COLORS.uniform, size: 9, symbol: "square" }, "markers"),
      series(s.qat, "fine-tuned (QAT)", "qat", "y", acc, { color: COLORS.qat, size: 13, symbol: "star" }, "markers"),
      series(s.mixed, "mixed precision", "mixed", "y2", pred, { color: COLORS.mixed, size: 7 }, "lines+markers"),
      series(s.uniform, "uniform", "uniform", "y2", pred, { color: COLORS.uniform, size: 9, symbol: "square" }, "markers"),
    ];
    const chosen = allPoints().find((p) => p.index === selected);
    if (chosen && chosen.x[xKey] != null) {
      for (const [axis, y] of [["y", chosen.accuracy], ["y2", chosen.predicted]]) {
        if (y == null) continue;
        traces.push({
          type: "scatter", mode: "markers", name: "selected", showlegend: axis === "y", legendgroup: "selected",
          x: [chosen.x[xKey]], y: [y], xaxis: "x", yaxis: axis, hoverinfo: "skip",
          marker: { size: 17, color: "rgba(0,0,0,0)", line: { color: COLORS.selected, width: 2.5 } },
        });
      }
    }
    return traces;
  }

  function frontLayout() {
    const predicted = allPoints().map((p) => p.predicted).filter((v) => v != null);
    const title = front.x_metrics.find((m) => m.key === xKey)?.title || xKey;
    return {
      height: 470,
      margin: { l: 60, r: 14, t: 28, b: 46 },
      hovermode: "closest",
      legend: { orientation: "h", x: 0, y: 1.07 },
      xaxis: { title: { text: title }, anchor: "y2", zeroline: false },
      yaxis: { title: { text: front.accuracy_key === "top1" ? "measured top-1 (%)" : "agreement (%)" }, domain: [0.53, 1] },
      yaxis2: {
        title: { text: "predicted loss increase" },
        domain: [0, 0.45],
        type: predicted.length && predicted.every((v) => v > 0) ? "log" : "linear",
        exponentformat: "power",
      },
      uirevision: xKey, // keep the user's zoom while the data refresh, not across metrics
    };
  }

  async function drawFront() {
    const empty = !allPoints().length;
    document.getElementById("front-empty").hidden = !empty;
    frontEl.hidden = empty;
    document.getElementById("x-metric-label").hidden = empty;
    if (empty) return;
    fillXSelect();
    await Plotly.react(frontEl, frontTraces(), frontLayout(), CONFIG);
    frontEl.dataset.qatPoints = String(front.series.qat.length);
    if (!frontEl.dataset.wired) {
      frontEl.dataset.wired = "1";
      frontEl.on("plotly_click", (event) => {
        const point = event.points && event.points[0];
        if (point && point.customdata != null) selectPoint(point.customdata);
      });
    }
  }

  function drawHeatmap() {
    const h = payload.heatmap;
    if (!h) return Promise.resolve();
    const z = h.values.map((row) => row.map((v) => (v == null ? null : Math.log10(Math.max(v, 1e-12)))));
    const text = h.values.map((row) => row.map((v) => (v == null ? "n/a" : v.toPrecision(3))));
    return Plotly.newPlot(
      heatEl,
      [{
        type: "heatmap", x: h.options, y: h.layers, z, text, colorscale: "YlOrRd", reversescale: true, // red: sensitive
        hovertemplate: "%{y} at %{x}<br>predicted loss increase %{text}<extra></extra>",
        colorbar: { title: { text: "log₁₀" }, thickness: 12, nticks: 6 },
      }],
      {
        height: Math.max(240, Math.min(520, 90 + 16 * h.layers.length)),
        margin: { l: 10, r: 10, t: 10, b: 40 },
        yaxis: { autorange: "reversed", automargin: true, type: "category" },
        xaxis: { type: "category", title: { text: "bit option" } },
      },
      CONFIG,
    );
  }

  function drawAllocation() {
    if (!allocation) return Promise.resolve();
    const layers = allocation.layers;
    const names = layers.map((l) => l.name);
    const metric = allocation.share_metrics.includes(xKey) ? xKey : allocation.share_metrics[0];
    const traces = [
      {
        type: "bar", name: "weight bits", x: names, y: layers.map((l) => l.weight_bits), marker: { color: COLORS.mixed },
        hovertemplate: "%{x}: %{y}-bit weights<extra></extra>",
      },
      {
        type: "bar", name: "activation bits", x: names, y: layers.map((l) => l.activation_bits), marker: { color: COLORS.act },
        hovertemplate: "%{x}: %{y}-bit activations<extra></extra>",
      },
    ];
    if (metric) {
      traces.push({
        type: "scatter", mode: "lines+markers", name: `share of ${SHARE_TITLES[metric] || metric}`, yaxis: "y2",
        x: names, y: layers.map((l) => (l.share[metric] == null ? null : 100 * l.share[metric])),
        marker: { color: COLORS.selected, size: 5 }, line: { color: COLORS.selected, width: 1.5 },
        hovertemplate: "%{x}: %{y:.1f} %<extra></extra>",
      });
    }
    return Plotly.react(
      allocEl,
      traces,
      {
        height: 330,
        margin: { l: 48, r: metric ? 52 : 12, t: 28, b: 10 },
        barmode: "group",
        legend: { orientation: "h", x: 0, y: 1.14 },
        xaxis: { type: "category", automargin: true, tickangle: names.length > 12 ? -60 : 0 },
        yaxis: { title: { text: "bits" }, type: "log", tickvals: [1, 2, 3, 4, 6, 8, 16, 32], range: [-0.05, Math.log10(40)] },
        yaxis2: metric
          ? { title: { text: "% of cost" }, overlaying: "y", side: "right", rangemode: "tozero", showgrid: false, tickmode: "auto", type: "linear" }
          : undefined,
      },
      CONFIG,
    );
  }

  // Show a point's allocation: `layers` when the page already has it, else fetched.
  // The recommendation's evidence for the shown point: Δ against the uniform baseline, its interval and n.
  function describeTest(role, t, unit) {
    if (!t) return `${role}: no paired test`;
    const ci = t.ci[0] != null && t.ci[1] != null ? ` [${t.ci[0].toFixed(2)}, ${t.ci[1].toFixed(2)}]` : "";
    const level = t.confidence != null ? ` (${Math.round(100 * t.confidence)} %)` : "";
    const verdict = t.significant == null ? "" : t.significant ? ", significant" : ", not significant";
    return `${role}: Δ ${t.delta >= 0 ? "+" : ""}${t.delta.toFixed(2)}${unit}${ci}${level}, n = ${t.n}${verdict}`;
  }

  function showEvidence(point) {
    const box = document.getElementById("alloc-evidence");
    const items = (point && point.evidence) || [];
    box.hidden = !items.length;
    box.dataset.point = point ? String(point.index) : "";
    box.replaceChildren(
      ...items.map((e) => {
        const div = document.createElement("div");
        div.className = "evidence";
        const head = document.createElement("p");
        const who = e.recommended === "mixed" ? "mixed precision" : "uniform";
        head.textContent = `Recommended (${who}) at ${e.budgets.join(", ") || "the front's budgets"}` +
          (e.requested ? "" : " (a swept budget)") + (e.reason ? `: ${e.reason}` : "");
        const list = document.createElement("ul");
        const unit = e.ranking === "top1" || e.ranking === "agreement" ? " points" : "";
        const vs = document.createElement("li");
        vs.textContent = `${e.contender || "mixed"} − ${e.baseline || "uniform"} on ${e.ranking || "the ranking metric"}`;
        list.append(vs);
        for (const [role, t] of [["selection", e.selection], ["report", e.report]]) {
          const li = document.createElement("li");
          li.className = `evidence-${role}`;
          li.textContent = describeTest(role, t, unit);
          list.append(li);
        }
        div.append(head, list);
        return div;
      }),
    );
  }

  async function selectPoint(index, layers = null, redrawFront = true) {
    if (!layers) {
      const response = await fetch(`/ui/api/searches/${searchId}/allocations/${index}/layers`, { credentials: "same-origin" });
      if (!response.ok) return;
      layers = await response.json();
    }
    allocation = layers;
    selected = index;
    const point = allPoints().find((p) => p.index === index);
    document.getElementById("alloc-title").textContent = point ? `· ${point.label} (point ${index})` : `· point ${index}`;
    showEvidence(point);
    document.getElementById("alloc-hint").hidden = true;
    const link = document.getElementById("alloc-download");
    link.href = `/ui/api/searches/${searchId}/allocations/${index}`;
    link.setAttribute("download", `allocation-${searchId.slice(0, 8)}-${index}.json`);
    link.hidden = false;
    finetuneForm.hidden = !payload.finished;
    finetuneForm.elements.point.value = String(index);
    finetuneForm.querySelector(".form-ok").hidden = true;
    await Promise.all([drawAllocation(), redrawFront ? drawFront() : null]);
    allocEl.dataset.point = String(index);
  }

  async function refreshFront() {
    const response = await fetch(`/ui/api/searches/${searchId}/front`, { credentials: "same-origin" });
    if (!response.ok) return;
    front = await response.json();
    await drawFront();
  }

  // --- trials (bayes, bomp-nas) and QBitOpt's bits over training ---------------------------------------
  const trialsEl = document.getElementById("trials-chart");
  const trialsSelect = document.getElementById("trials-x-metric");
  const bitsEl = document.getElementById("bits-chart");
  let trials = payload.trials;
  let trialsX = null;
  let bitsHistory = payload.bits_history;

  function trialCounts(p) {
    const words = [`${trials.points.length} measured`, `${trials.pareto_count} Pareto-optimal`];
    if (p.failed) words.push(`${p.failed} failed`);
    if (p.pruned) words.push(`${p.pruned} pruned`);
    if (p.infeasible) words.push(`${p.infeasible} over budget (costed, not measured)`);
    if (p.running) words.push(`${p.running} running`);
    if (p.waiting) words.push(`${p.waiting} queued`);
    return words.join(" · ");
  }

  async function drawTrials() {
    if (!trialsEl || !trials) return;
    const p = trials.progress;
    document.getElementById("trials-progress").textContent =
      `· ${p.done}${p.total != null ? ` / ${p.total}` : ""} trials finished`;
    const counts = document.getElementById("trials-counts");
    counts.textContent = trialCounts(p);
    counts.dataset.failed = String(p.failed);
    counts.dataset.pruned = String(p.pruned);
    counts.dataset.infeasible = String(p.infeasible);
    const keys = trials.x_metrics.map((m) => m.key);
    const empty = !trials.points.length || !keys.length;
    document.getElementById("trials-empty").hidden = !empty;
    document.getElementById("trials-x-label").hidden = empty;
    trialsEl.hidden = empty;
    trialsEl.dataset.done = String(p.done);
    if (empty) return;
    if (!keys.includes(trialsX)) trialsX = keys.includes(xKey) ? xKey : trials.default_x;
    trialsSelect.replaceChildren(
      ...trials.x_metrics.map((m) => {
        const option = document.createElement("option");
        option.value = m.key;
        option.textContent = m.title;
        option.selected = m.key === trialsX;
        return option;
      }),
    );
    const shown = trials.points.filter((t) => t.x[trialsX] != null);
    const trace = (points, extra) => ({
      type: "scatter", x: points.map((t) => t.x[trialsX]), y: points.map((t) => t.score),
      customdata: points.map((t) => t.number), hovertext: points.map((t) => t.hover), hoverinfo: "text", ...extra,
    });
    const best = shown.filter((t) => t.pareto).sort((a, b) => a.x[trialsX] - b.x[trialsX]);
    const onStudyAxis = trialsX === trials.cost_metric; // the Pareto set is the study's, on its own cost
    const costTitle = trials.x_metrics.find((m) => m.key === trials.cost_metric)?.title || trials.cost_metric;
    await Plotly.react(
      trialsEl,
      [
        trace(shown.filter((t) => !t.pareto), {
          mode: "markers", name: "trial", meta: "trials", marker: { color: "#94a3b8", size: 7, opacity: 0.85 },
        }),
        trace(best, {
          mode: onStudyAxis ? "lines+markers" : "markers", name: `Pareto-optimal (on ${costTitle})`, meta: "pareto",
          marker: { color: COLORS.selected, size: 10, symbol: "diamond", line: { color: "#111827", width: 1 } },
          line: { color: COLORS.selected, width: 1.2, dash: "dot", shape: trials.direction === "maximize" ? "hv" : "vh" },
        }),
      ],
      {
        height: 380,
        margin: { l: 60, r: 14, t: 28, b: 46 },
        hovermode: "closest",
        legend: { orientation: "h", x: 0, y: 1.1 },
        xaxis: { title: { text: trials.x_metrics.find((m) => m.key === trialsX)?.title || trialsX }, zeroline: false },
        yaxis: { title: { text: trials.score_title } },
        uirevision: trialsX,
      },
      CONFIG,
    );
    trialsEl.dataset.points = String(shown.length);
    trialsEl.dataset.pareto = String(best.length);
  }

  async function refreshTrials() {
    if (!trialsEl) return;
    const response = await fetch(`/ui/api/searches/${searchId}/trials`, { credentials: "same-origin" });
    if (!response.ok) return;
    trials = await response.json();
    await drawTrials();
  }

  function drawBits() {
    if (!bitsEl) return Promise.resolve();
    const h = bitsHistory;
    document.getElementById("bits-empty").hidden = !!h;
    bitsEl.hidden = !h;
    if (!h) return Promise.resolve();
    const values = h.bits.flat().filter((v) => v != null);
    bitsEl.dataset.layers = String(h.layers.length);
    bitsEl.dataset.steps = String(h.steps.length);
    return Plotly.react(
      bitsEl,
      [{
        type: "heatmap", x: h.steps, y: h.layers, z: h.bits, text: h.labels, colorscale: "Viridis",
        zmin: Math.min(...values), zmax: Math.max(...values), xgap: 1, ygap: 1,
        hovertemplate: "%{y} at step %{x}: %{text}<extra></extra>",
        colorbar: { title: { text: "weight bits" }, thickness: 12, dtick: 1 },
      }],
      {
        height: Math.max(220, Math.min(560, 90 + 18 * h.layers.length)),
        margin: { l: 10, r: 10, t: 10, b: 46 },
        yaxis: { autorange: "reversed", automargin: true, type: "category" },
        xaxis: { title: { text: `training step (${h.changes} layer change${h.changes === 1 ? "" : "s"} over ${h.steps.length} re-allocation${h.steps.length === 1 ? "" : "s"})` } },
      },
      CONFIG,
    );
  }

  async function refreshBits() {
    if (!bitsEl) return;
    const response = await fetch(`/ui/api/searches/${searchId}/bits-history`, { credentials: "same-origin" });
    if (!response.ok) return;
    bitsHistory = await response.json();
    await drawBits();
  }

  // --- live status -------------------------------------------------------------------------------------
  let polling = false;
  let signature = payload.signature;

  async function refreshStatus() {
    const html = await Dash.fetchFragment(document.getElementById("status-area").dataset.url);
    if (!html) return true;
    Dash.swapFragments(html);
    await Promise.all([refreshTrials(), refreshBits()]); // trials and re-allocations as they happen
    const summary = document.getElementById("search-summary");
    if (summary.dataset.signature !== signature) {
      signature = summary.dataset.signature;
      if (!payload.finished && summary.dataset.status === "succeeded") {
        window.location.reload(); // the search itself finished: the page renders its results
        return false;
      }
      await refreshFront(); // a fine-tuning finished: its result joins the front
    }
    return summary.dataset.active === "1";
  }

  function startPolling() {
    if (polling) return;
    polling = true;
    Dash.pollWhile(async () => {
      const again = await refreshStatus();
      polling = again;
      return again;
    });
  }

  document.addEventListener("click", async (event) => {
    const button = event.target.closest("button.cancel-job");
    if (!button) return;
    button.disabled = true;
    await Dash.send("POST", `/ui/api/jobs/${button.dataset.job}/cancel`);
    await refreshStatus();
  });

  Dash.onSubmit(finetuneForm, async () => {
    const f = finetuneForm.elements;
    const num = (text) => (text.trim() !== "" && !Number.isNaN(Number(text)) ? Number(text) : text.trim());
    const body = { points: [Number(f.point.value)], recipe: { steps: num(f.steps.value), lr: num(f.lr.value) } };
    const result = await Dash.send("POST", `/ui/api/searches/${searchId}/finetune`, body);
    if (!result.ok) {
      Dash.showErrors(finetuneForm, result);
      return;
    }
    const ok = finetuneForm.querySelector(".form-ok");
    ok.textContent = `Fine-tuning queued (job ${result.body.jobs.map((j) => j.job_id.slice(0, 8)).join(", ")}); its result joins the front when done.`;
    ok.hidden = false;
    await refreshStatus();
    startPolling();
  });

  xSelect.addEventListener("change", async () => {
    xKey = xSelect.value;
    if (trials && trials.x_metrics.some((m) => m.key === xKey)) trialsX = xKey; // one cost axis for both
    await Promise.all([drawFront(), drawAllocation(), drawTrials()]);
  });

  if (trialsSelect) {
    trialsSelect.addEventListener("change", async () => {
      trialsX = trialsSelect.value;
      await drawTrials();
    });
  }

  async function init() {
    performance.mark("dashboard-init");
    const drawn = [drawHeatmap().then(() => performance.mark("heatmap-drawn"))];
    if (payload.allocation) {
      selected = payload.allocation.point; // drawn with the front's first draw
      drawn.push(selectPoint(payload.allocation.point, payload.allocation, false).then(() => performance.mark("allocation-drawn")));
    }
    drawn.push(drawFront().then(() => performance.mark("front-drawn")));
    drawn.push(drawTrials(), drawBits());
    await Promise.all(drawn);
    // When the charts are on screen (read by the page-load benchmark).
    window.dashboardRenderedAt = performance.now();
    document.body.dataset.rendered = "1";
    if (document.getElementById("search-summary").dataset.active === "1") startPolling();
  }

  init();
})();
