// tunelab app: the live parts of the pages (machine panel, job status, log tail, charts, chat, base beside tuned,
// predict, export, push, the comparison's overlaid curves). No libraries.
"use strict";
const tunelab = (() => {
  const csrf = () => document.querySelector('meta[name="csrf-token"]').content;
  const FINISHED = ["completed", "failed", "cancelled", "interrupted"];

  async function getJSON(url) {
    const response = await fetch(url, { headers: { Accept: "application/json" } });
    if (!response.ok) throw new Error(`${url}: ${response.status}`);
    return response.json();
  }

  async function postJSON(url, body) {
    const response = await fetch(url, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf() },
      body: JSON.stringify(body),
    });
    const data = await response.json().catch(() => ({}));
    if (!response.ok) {
      const errors = data.errors ? Object.values(data.errors).join("; ") : data.detail || response.statusText;
      throw new Error(errors);
    }
    return data;
  }

  // What every chart draws first: the scales of its points, its axes and ticks. Returns the scales and an `add`
  // that appends SVG elements; `pad` widens a flat range (all values equal) into one the chart can show.
  function frame(svg, all, size, pad, tick) {
    const { W, H, L, R, T, B } = size;
    const ns = "http://www.w3.org/2000/svg";
    const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
    let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
    if (x0 === x1) x1 = x0 + 1;
    if (y0 === y1) [y0, y1] = pad(y0, y1);
    const px = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
    const py = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
    const add = (name, attrs, text) => {
      const el = document.createElementNS(ns, name);
      for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
      if (text !== undefined) el.textContent = text;
      svg.appendChild(el);
      return el;
    };
    add("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" });
    add("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" });
    for (const y of [y0, (y0 + y1) / 2, y1]) add("text", { x: L - 6, y: py(y) + 4, "text-anchor": "end", class: "tick" }, tick(y));
    for (const x of [x0, x1]) add("text", { x: px(x), y: H - B + 16, "text-anchor": "middle", class: "tick" }, String(x));
    return { add, px, py };
  }

  // The loss chart: an SVG polyline per series, redrawn from all points on each poll.
  function drawChart(svg, series) {
    const size = { W: 480, H: 260, L: 52, R: 12, T: 12, B: 34 };
    const all = [...series.loss, ...series.eval_loss];
    svg.replaceChildren();
    if (all.length === 0) return;
    const { add, px, py } = frame(svg, all, size, (y0, y1) => [y0 - 0.5, y1 + 0.5], (y) => y.toFixed(3));
    add("text", { x: (size.L + size.W - size.R) / 2, y: size.H - 4, "text-anchor": "middle", class: "tick" }, "step");
    for (const [name, cls] of [["loss", "train"], ["eval_loss", "eval"]]) {
      const points = series[name];
      if (!points.length) continue;
      add("polyline", { points: points.map((p) => `${px(p[0])},${py(p[1])}`).join(" "), class: `series ${cls}` });
      for (const p of points) add("circle", { cx: px(p[0]), cy: py(p[1]), r: 2.5, class: `point ${cls}` });
    }
  }

  const PALETTE = ["#2f6fdb", "#d9822b", "#1e7b34", "#b3261e", "#7b3fb3", "#0f8b8d", "#8a6d00", "#5b6770"];

  // One chart of several series ({name: [[step, value], ...]}) with a legend; `index` maps a series to a colour.
  function drawSeries(svg, series, index) {
    const size = { W: 480, H: 240, L: 58, R: 12, T: 12, B: 30 };
    svg.replaceChildren();
    const names = Object.keys(series);
    const all = names.flatMap((n) => series[n]);
    if (!all.length) return;
    const pad = (y0, y1) => [y0 - (Math.abs(y0) * 0.1 || 0.5), y1 + (Math.abs(y1) * 0.1 || 0.5)];
    const tick = (v) => (Math.abs(v) >= 1000 || (Math.abs(v) < 0.01 && v !== 0) ? v.toExponential(1) : v.toPrecision(3));
    const { add, px, py } = frame(svg, all, size, pad, tick);
    names.forEach((name, i) => {
      const colour = PALETTE[(index ? index(name, i) : i) % PALETTE.length];
      const points = series[name];
      // The evaluation's series dashed: a run's train and eval curves share its colour on the compare page
      const dashed = /(^|: )eval_/.test(name) ? { "stroke-dasharray": "5 3" } : {};
      add("polyline", {
        points: points.map((p) => `${px(p[0])},${py(p[1])}`).join(" "),
        fill: "none", stroke: colour, "stroke-width": 2, class: "series", "data-series": name, ...dashed,
      });
      // Few points (an evaluation per epoch): each one marked, so a single point still shows
      if (points.length <= 30) for (const p of points) add("circle", { cx: px(p[0]), cy: py(p[1]), r: 3, fill: colour });
    });
    svg.dataset.series = names.join("|");
  }

  // A grid of chart cards ({id, title, series}) in `box`, each redrawn in place on later calls.
  function drawCharts(box, charts, index) {
    for (const chart of charts) {
      let card = box.querySelector(`[data-chart="${chart.id}"]`);
      if (!card) {
        card = document.createElement("figure");
        card.className = "chart-card";
        card.dataset.chart = chart.id;
        const title = document.createElement("figcaption");
        title.textContent = chart.title;
        const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
        svg.setAttribute("viewBox", "0 0 480 240");
        svg.setAttribute("class", "chart");
        svg.setAttribute("role", "img");
        svg.setAttribute("aria-label", chart.title);
        const legend = document.createElement("p");
        legend.className = "legend";
        card.append(title, svg, legend);
        box.appendChild(card);
      }
      drawSeries(card.querySelector("svg"), chart.series, index);
      const legend = card.querySelector(".legend");
      legend.replaceChildren();
      Object.keys(chart.series).forEach((name, i) => {
        const item = document.createElement("span");
        item.className = "key";
        item.style.setProperty("--colour", PALETTE[(index ? index(name, i) : i) % PALETTE.length]);
        const points = chart.series[name];
        item.textContent = `${name} (${points[points.length - 1][1].toPrecision(4)})`;
        legend.appendChild(item);
      });
    }
  }

  const bytes = (n) => (n >= 2 ** 30 ? `${(n / 2 ** 30).toFixed(1)} GiB` : `${(n / 2 ** 20).toFixed(0)} MiB`);

  // The machine panel in every page's header: device, accelerator memory, RAM, disk, the running job's peak.
  function machinePanel() {
    const box = document.getElementById("machine");
    if (!box) return;
    const refresh = async () => {
      try {
        const m = await getJSON("/api/machine");
        const parts = [m.device];
        if (m.accelerator_total_bytes) {
          parts.push(`accelerator ${bytes(m.accelerator_used_bytes)} / ${bytes(m.accelerator_total_bytes)}`);
        }
        if (m.ram_total_bytes) parts.push(`RAM ${bytes(m.ram_total_bytes - m.ram_available_bytes)} / ${bytes(m.ram_total_bytes)} in use`);
        if (m.disk_free_bytes != null) parts.push(`disk free ${bytes(m.disk_free_bytes)}`);
        if (m.peak_memory_gib != null) parts.push(`running job peak ${m.peak_memory_gib.toFixed(2)} GiB`);
        box.textContent = parts.join(" · ");
        box.dataset.loaded = "1";
      } catch (err) {
        box.textContent = "";
      }
      setTimeout(refresh, 5000);
    };
    refresh();
  }

  function comparePage(ids) {
    const box = document.getElementById("charts");
    const jobs = ids.split(",");
    const index = (name) => Math.max(0, jobs.indexOf(name.slice(1).split(":")[0]));
    document.querySelectorAll(".swatch").forEach((el) => {
      el.style.background = PALETTE[Number(el.dataset.seriesIndex) % PALETTE.length];
    });
    getJSON(`/api/compare?jobs=${ids}`).then((data) => {
      drawCharts(box, data.charts, index);
      box.dataset.loaded = "1";
    });
  }

  function jobPage(jobId, status, classifier) {
    const logBox = document.getElementById("log");
    const svg = document.getElementById("chart");
    const note = document.getElementById("chart-note");
    const statusBox = document.getElementById("status");
    let offset = -1; // start near the end of a long log

    async function poll() {
      try {
        const log = await getJSON(`/api/jobs/${jobId}/log?offset=${offset}`);
        if (log.text) {
          const atBottom = logBox.scrollTop + logBox.clientHeight >= logBox.scrollHeight - 4;
          logBox.textContent += log.text;
          if (atBottom) logBox.scrollTop = logBox.scrollHeight;
        }
        offset = log.offset;
        const metrics = await getJSON(`/api/jobs/${jobId}/metrics`);
        drawChart(svg, metrics.points);
        drawCharts(document.getElementById("charts"), metrics.charts.filter((c) => c.id !== "loss"));
        const n = metrics.points.loss.length;
        svg.dataset.points = String(n);
        if (n) note.textContent = `${n} logged steps; last loss ${metrics.points.loss[n - 1][1].toFixed(4)}`;
        if (document.getElementById("completions")) await showCompletions(jobId);
        statusBox.textContent = metrics.status;
        statusBox.className = `status ${metrics.status}`;
        if (metrics.status !== status && FINISHED.includes(metrics.status)) {
          window.location.reload(); // the finished page has the results, downloads and the chat box
          return;
        }
        if (FINISHED.includes(metrics.status)) return;
      } catch (err) {
        note.textContent = `(connection lost: ${err.message}; retrying)`;
      }
      setTimeout(poll, 500);
    }
    poll();
    if (status === "completed") {
      if (classifier) {
        predictBox(jobId);
      } else {
        chatBox(jobId);
        sideBySide(jobId);
        exportBox(jobId, "gguf", "export-form", "export-result", () => ({ dtype: document.getElementById("export-dtype").value }));
        exportBox(jobId, "adapter", "adapter-form", "adapter-result", () => ({}));
      }
      exportBox(jobId, "merged", "merge-form", "merge-result", () => ({}));
      pushBox(jobId);
    }
  }

  // Base beside tuned: one prompt to both, greedy and seeded alike; the evaluation samples' buttons fill it.
  function sideBySide(jobId) {
    const form = document.getElementById("side-form");
    const input = document.getElementById("side-input");
    const base = document.getElementById("side-base");
    const tuned = document.getElementById("side-tuned");
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const message = input.value.trim();
      if (!message) return;
      base.textContent = tuned.textContent = "…";
      base.classList.add("pending");
      form.querySelector("button").disabled = true;
      try {
        const data = await postJSON(`/api/jobs/${jobId}/side-by-side`, { message, sample: false, seed: 0 });
        base.textContent = data.base || "(an empty answer)";
        tuned.textContent = data.tuned || "(an empty answer)";
      } catch (err) {
        base.textContent = tuned.textContent = err.message;
      } finally {
        base.classList.remove("pending");
        form.querySelector("button").disabled = false;
      }
    });
    for (const button of document.querySelectorAll(".ask-again")) {
      button.addEventListener("click", () => {
        input.value = button.dataset.prompt;
        form.requestSubmit();
        form.scrollIntoView({ behavior: "smooth" });
      });
    }
  }

  // A classifier's predict box: every label's probability as a bar.
  function predictBox(jobId) {
    const form = document.getElementById("predict-form");
    const input = document.getElementById("predict-input");
    const out = document.getElementById("prediction");
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const text = input.value.trim();
      if (!text) return;
      out.textContent = "…";
      try {
        const data = await postJSON(`/api/jobs/${jobId}/predict`, { text });
        out.replaceChildren();
        const head = document.createElement("p");
        head.className = "score";
        head.id = "predicted-label";
        head.textContent = data.label;
        out.appendChild(head);
        for (const { label, p } of data.probabilities) {
          const row = document.createElement("div");
          row.className = "probability";
          row.dataset.label = label;
          const bar = document.createElement("span");
          bar.className = "bar";
          bar.style.width = `${Math.round(200 * p)}px`;
          row.append(`${label} `, bar, ` ${(100 * p).toFixed(1)}%`);
          out.appendChild(row);
        }
      } catch (err) {
        out.textContent = err.message;
        out.className = "error";
      }
    });
  }

  function pushBox(jobId) {
    const form = document.getElementById("push-form");
    const result = document.getElementById("push-result");
    const show = (data) => {
      result.className = data.state === "failed" ? "error" : "hint";
      result.textContent = {
        running: `pushing… ${data.progress || ""} (${data.seconds || 0} s)`,
        failed: data.error,
        done: `pushed: ${data.url}`,
        none: "",
      }[data.state];
      form.querySelector("button").disabled = data.state === "running";
      return data.state;
    };
    const poll = async () => {
      if (show(await getJSON(`/api/jobs/${jobId}/export?kind=push`)) === "running") setTimeout(poll, 1000);
    };
    poll(); // a push already running (or done) when the page was opened
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const token = document.getElementById("push-token");
      try {
        show(await postJSON(`/api/jobs/${jobId}/push`, { repo_id: document.getElementById("push-repo").value.trim(), token: token.value || null }));
        token.value = "";
        setTimeout(poll, 1000);
      } catch (err) {
        result.textContent = err.message;
        result.className = "error";
      }
    });
  }

  // A grpo job's samples: prompt, completion, each reward's score.
  async function showCompletions(jobId) {
    const box = document.getElementById("completions");
    const { samples } = await getJSON(`/api/jobs/${jobId}/completions`);
    box.replaceChildren();
    for (const s of samples) {
      const item = document.createElement("div");
      item.className = "sample";
      const head = document.createElement("p");
      head.className = "hint";
      const prompt = Array.isArray(s.prompt) ? s.prompt.map((m) => m.content).join(" / ") : s.prompt;
      const scores = Object.entries(s.rewards).map(([name, v]) => `${name} ${v}`).join(", ");  // (labels: short)
      head.textContent = `step ${s.step} · reward ${s.reward} (${scores}) · ${prompt}`;
      const body = document.createElement("pre");
      body.className = "completion";
      body.textContent = s.completion;
      item.append(head, body);
      box.appendChild(item);
    }
  }

  // An export button (kind gguf, adapter or merged): start it, then poll its state (with its latest progress line) until
  // the files to download (or the reason it failed) show.
  function exportBox(jobId, kind, formId, resultId, options) {
    const form = document.getElementById(formId);
    const result = document.getElementById(resultId);
    if (!form) return;
    const show = (data) => {
      result.replaceChildren();
      const line = (cls, text) => {
        const p = document.createElement("p");
        p.className = cls;
        p.textContent = text;
        result.appendChild(p);
        return p;
      };
      if (data.state === "running") line("hint progress", `exporting${data.dtype ? ` (${data.dtype})` : ""}… ${data.progress || ""} (${data.seconds || 0} s)`);
      if (data.state === "failed") line("error", data.error);
      if (data.state === "done") {
        for (const file of data.files) {
          const a = document.createElement("a");
          a.href = file.url;
          a.className = "button";
          const size = file.bytes < 1e6 ? `${(file.bytes / 1e3).toFixed(1)} kB` : `${(file.bytes / 1e6).toFixed(1)} MB`;
          a.textContent = `${file.name} (${size})`;
          line("", "").appendChild(a);
        }
        if (data.command) {
          const code = document.createElement("code");
          code.textContent = data.command;
          line("hint", "then: ").appendChild(code);
        }
      }
      form.querySelector("button").disabled = data.state === "running";
      return data.state;
    };
    const poll = async () => {
      if (show(await getJSON(`/api/jobs/${jobId}/export?kind=${kind}`)) === "running") setTimeout(poll, 1000);
    };
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      try {
        show(await postJSON(`/api/jobs/${jobId}/export`, { kind, ...options() }));
        setTimeout(poll, 1000);
      } catch (err) {
        result.textContent = err.message;
        result.className = "error";
      }
    });
    poll();
  }

  // A reasoning model's answer: [its reasoning, or null; the answer after it, or null when the reasoning was cut
  // off], as `tunelab serve` reads them apart (inference/reasoning.py). An answer may begin inside the block when
  // the chat template opened it (DeepSeek-R1's): a </think> with no <think> before it closes that one.
  function splitReasoning(text) {
    const lead = text.trimStart();
    const opened = lead.startsWith("<think>");
    const inner = opened ? lead.slice("<think>".length) : text;
    const end = inner.indexOf("</think>");
    if (end < 0) return opened ? [inner.trim(), null] : [null, text];
    return [inner.slice(0, end).trim() || null, inner.slice(end + "</think>".length).trimStart()];
  }

  // An assistant turn: its reasoning folded away (open it to read), then the answer.
  function showAnswer(turn, text) {
    const [reasoning, answer] = splitReasoning(text);
    turn.textContent = "";
    if (reasoning !== null) {
      const details = document.createElement("details");
      details.className = "reasoning";
      const summary = document.createElement("summary");
      summary.textContent = "reasoning";
      details.append(summary, reasoning);
      turn.appendChild(details);
    }
    if (answer === null) turn.append("(no answer: the reasoning was cut off at the answer's length limit)");
    else turn.append(answer || (reasoning === null ? "(an empty answer)" : ""));
  }

  function chatBox(jobId) {
    const form = document.getElementById("chat-form");
    const input = document.getElementById("chat-input");
    const box = document.getElementById("chat");
    const history = [];
    const say = (role, text) => {
      const p = document.createElement("p");
      p.className = `turn ${role}`;
      p.textContent = text;
      box.appendChild(p);
      box.scrollTop = box.scrollHeight;
      return p;
    };
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const message = input.value.trim();
      if (!message) return;
      input.value = "";
      say("user", message);
      const pending = say("assistant pending", "…");
      form.querySelector("button").disabled = true;
      try {
        const sample = document.getElementById("chat-sample").checked;
        const temperature = Number(document.getElementById("chat-temperature").value) || 0.7;
        const data = await postJSON(`/api/jobs/${jobId}/chat`, { message, history, sample, temperature });
        pending.className = "turn assistant";
        showAnswer(pending, data.answer || "");
        // the whole answer, reasoning included, as the model wrote it (and as training gave it earlier turns)
        history.push({ role: "user", content: message }, { role: "assistant", content: data.answer });
      } catch (err) {
        pending.className = "turn error";
        pending.textContent = err.message;
      } finally {
        form.querySelector("button").disabled = false;
        input.focus();
      }
    });
  }

  return { jobPage, drawChart, drawCharts, machinePanel, comparePage, splitReasoning };
})();
