// tunelab app: the job page's live parts (status, log tail, loss chart) and the chat box. No libraries.
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

  // The loss chart: an SVG polyline per series, redrawn from all points on each poll.
  function drawChart(svg, series) {
    const W = 480, H = 260, L = 52, R = 12, T = 12, B = 34;
    const all = [...series.loss, ...series.eval_loss];
    const ns = "http://www.w3.org/2000/svg";
    svg.replaceChildren();
    if (all.length === 0) return;
    const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
    let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
    if (x0 === x1) x1 = x0 + 1;
    if (y0 === y1) { y0 -= 0.5; y1 += 0.5; }
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
    for (const y of [y0, (y0 + y1) / 2, y1]) {
      add("text", { x: L - 6, y: py(y) + 4, "text-anchor": "end", class: "tick" }, y.toFixed(3));
    }
    for (const x of [x0, x1]) add("text", { x: px(x), y: H - B + 16, "text-anchor": "middle", class: "tick" }, String(x));
    add("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle", class: "tick" }, "step");
    for (const [name, cls] of [["loss", "train"], ["eval_loss", "eval"]]) {
      const points = series[name];
      if (!points.length) continue;
      add("polyline", { points: points.map((p) => `${px(p[0])},${py(p[1])}`).join(" "), class: `series ${cls}` });
      for (const p of points) add("circle", { cx: px(p[0]), cy: py(p[1]), r: 2.5, class: `point ${cls}` });
    }
  }

  function jobPage(jobId, status) {
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
      chatBox(jobId);
      exportBox(jobId);
    }
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
      const scores = Object.entries(s.rewards).map(([name, v]) => `${name.split(/[/:]/).pop()} ${v}`).join(", ");
      head.textContent = `step ${s.step} · reward ${s.reward} (${scores}) · ${prompt}`;
      const body = document.createElement("pre");
      body.className = "completion";
      body.textContent = s.completion;
      item.append(head, body);
      box.appendChild(item);
    }
  }

  // The Export button: start the export, then poll its state until the files (or the reason it failed) show.
  function exportBox(jobId) {
    const form = document.getElementById("export-form");
    const result = document.getElementById("export-result");
    const show = (data) => {
      result.replaceChildren();
      const line = (cls, text) => {
        const p = document.createElement("p");
        p.className = cls;
        p.textContent = text;
        result.appendChild(p);
        return p;
      };
      if (data.state === "running") line("hint", `exporting (${data.dtype})…`);
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
        const code = document.createElement("code");
        code.textContent = data.command;
        line("hint", "then: ").appendChild(code);
      }
      form.querySelector("button").disabled = data.state === "running";
      return data.state;
    };
    const poll = async () => {
      if (show(await getJSON(`/api/jobs/${jobId}/export`)) === "running") setTimeout(poll, 1000);
    };
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      try {
        const dtype = document.getElementById("export-dtype").value;
        show(await postJSON(`/api/jobs/${jobId}/export`, { dtype }));
        setTimeout(poll, 1000);
      } catch (err) {
        result.textContent = err.message;
        result.className = "error";
      }
    });
    poll();
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
        pending.textContent = data.answer || "(an empty answer)";
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

  return { jobPage, drawChart };
})();
