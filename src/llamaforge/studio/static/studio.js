/* llamaforge studio: inline-SVG charts, live updates (Server-Sent Events), the job form, streamed chat.
   Hand-written and self-contained: the studio loads nothing from another host. */
"use strict";
const Studio = (() => {
  const $ = (sel, root = document) => root.querySelector(sel);
  const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));
  const NS = "http://www.w3.org/2000/svg";

  function el(tag, attrs = {}, text) {
    const node = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function niceTicks(lo, hi, count) {
    if (hi <= lo) hi = lo + 1;
    const raw = (hi - lo) / count, mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw);
    const ticks = [];
    for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(+t.toPrecision(12));
    return ticks;
  }

  /* series: [{name, cls, points: [[x, y], ...], dots}] drawn into an SVG with a 760x300 viewBox */
  function lineChart(svg, series) {
    svg.replaceChildren();
    const W = 760, H = 300, L = 56, R = 12, T = 12, B = 36;
    const all = series.flatMap((s) => s.points);
    if (!all.length) {
      svg.appendChild(el("text", {x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty"}, "no metrics yet"));
      return;
    }
    const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
    let [x0, x1] = [Math.min(...xs), Math.max(...xs)], [y0, y1] = [Math.min(...ys), Math.max(...ys)];
    if (x1 === x0) { x0 -= 1; x1 += 1; }
    const pad = (y1 - y0) * 0.08 || Math.abs(y0) * 0.05 || 1;
    y0 -= pad; y1 += pad;
    const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
    const sy = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
    for (const t of niceTicks(y0, y1, 5)) {
      svg.appendChild(el("line", {x1: L, x2: W - R, y1: sy(t), y2: sy(t), class: "grid"}));
      svg.appendChild(el("text", {x: L - 6, y: sy(t) + 4, "text-anchor": "end", class: "tick"}, String(t)));
    }
    for (const t of niceTicks(x0, x1, 8).filter((t) => Number.isInteger(t))) {
      svg.appendChild(el("text", {x: sx(t), y: H - B + 16, "text-anchor": "middle", class: "tick"}, String(t)));
    }
    svg.appendChild(el("text", {x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle", class: "axis"}, "optimizer step"));
    svg.appendChild(el("line", {x1: L, x2: L, y1: T, y2: H - B, class: "axis-line"}));
    svg.appendChild(el("line", {x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis-line"}));
    for (const s of series) {
      if (!s.points.length) continue;
      const d = s.points.map((p, i) => `${i ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ");
      svg.appendChild(el("path", {d, class: `line ${s.cls}`, "data-series": s.name}));
      if (s.dots || s.points.length < 40) {
        for (const [x, y] of s.points) {
          const dot = el("circle", {cx: sx(x), cy: sy(y), r: 3, class: `dot ${s.cls}`, "data-series": s.name,
                                    "data-step": x, "data-value": y});
          dot.appendChild(el("title", {}, `${s.name} step ${x}: ${y.toFixed(4)}`));
          svg.appendChild(dot);
        }
      }
    }
  }

  function fmt(v) { return typeof v === "number" ? v.toFixed(4) : "-"; }

  /* ------------------------------------------------------------------ run page */
  function runPage(rid, status) {
    const records = JSON.parse($("#metrics-data").textContent);
    const svg = $("#loss-chart");
    let live = 0;
    const draw = () => {
      const train = records.filter((r) => typeof r.loss === "number").map((r) => [r.step, r.loss]);
      const evals = records.filter((r) => typeof r.eval_loss === "number").map((r) => [r.step, r.eval_loss]);
      lineChart(svg, [{name: "train", cls: "train", points: train}, {name: "eval", cls: "eval", points: evals, dots: true}]);
      if (train.length) { $("#last-step").textContent = train[train.length - 1][0]; $("#last-loss").textContent = fmt(train[train.length - 1][1]); }
      if (evals.length) $("#last-eval").textContent = fmt(evals[evals.length - 1][1]);
      $("#live-count").textContent = live;
    };
    draw();
    const base = "/api/runs/" + rid;
    const active = (s) => s === "running" || s === "starting";
    if (active(status)) {
      const source = new EventSource(`${base}/events?start=${svg.dataset.lines || 0}`);
      source.addEventListener("metric", (e) => { records.push(JSON.parse(e.data)); live += 1; draw(); });
      source.addEventListener("status", (e) => {
        const row = JSON.parse(e.data);
        $("#run-status").textContent = row.status;
        $("#run-status").className = "status " + row.status;
        if (row.step !== null) $("#run-step").textContent = row.step;
        if (!active(row.status)) { source.close(); $("#run-finished").hidden = false; }
      });
    }
    const log = $("#job-log");
    if (log) {
      const src = new EventSource(`/api/jobs/${log.dataset.job}/log`);
      src.addEventListener("line", (e) => { log.textContent += JSON.parse(e.data) + "\n"; log.scrollTop = log.scrollHeight; });
      src.addEventListener("end", (e) => {
        log.textContent += `[exited ${JSON.parse(e.data).returncode}]\n`; src.close(); $("#stop-run").hidden = true;
        if ($("#job-result")) $("#job-result").hidden = false;
      });
    }
    const act = async (what, payload = {}) => {
      const r = await fetch(`${base}/${what}`, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(payload)});
      const body = await r.json();
      if (!r.ok) { $("#action-error").textContent = body.error || JSON.stringify(body); $("#action-error").hidden = false; return; }
      setTimeout(() => location.reload(), 500);
    };
    $("#stop-run").addEventListener("click", () => act("stop"));
    $("#resume-run").addEventListener("click", () => act("resume"));
    const exp = $("#export-run");
    if (exp) exp.addEventListener("click", () => act("export", {format: $("#export-format").value}));
    const ev = $("#eval-run");
    if (ev) ev.addEventListener("click", () => act("eval", {task: $("#eval-task").value, limit: $("#eval-limit").value,
                                                            fail_if: $("#eval-fail-if").value}));
    const serve = $("#serve-run");
    if (serve) serve.addEventListener("click", () => act("serve", {host: $("#serve-host").value}));
    $$("#served tr[data-served]").forEach(servedRow);
    rejects(rid);
  }

  /* a server started from the run page: its state until it has stopped, stop, and chat once ready */
  function servedRow(tr) {
    const sid = tr.dataset.served;
    const stop = $(".serve-stop", tr);
    stop.addEventListener("click", async () => {
      stop.disabled = true;
      const r = await fetch(`/api/serve/${sid}/stop`, {method: "POST"});
      show(await r.json());
    });
    function show(s) {
      const badge = $(".serve-state .status", tr);
      badge.textContent = s.state; badge.className = "status " + ({ready: "completed", starting: "running"}[s.state] || "interrupted");
      $(".serve-models", tr).textContent = s.models.join(", ");
      $(".serve-chat", tr).hidden = s.state !== "ready";
      stop.hidden = s.state === "stopped" || s.state === "exited";
      return s.state === "starting" || s.state === "ready";
    }
    (async function poll() {
      const r = await fetch(`/api/serve/${sid}`);
      if (r.ok && show(await r.json())) setTimeout(poll, 1000);
    })();
  }

  function rejects(rid) {
    const search = $("#rejects-search"), body = $("#rejects-table tbody");
    let offset = 0, matched = 0, timer = null;
    const LIMIT = 20;
    async function load() {
      const r = await fetch(`/api/runs/${rid}/rejects?q=${encodeURIComponent(search.value)}&offset=${offset}&limit=${LIMIT}`);
      const page = await r.json();
      matched = page.matched;
      body.replaceChildren(...page.items.map((it) => {
        const tr = document.createElement("tr");
        for (const [v, cls] of [[it.source, "path"], [it.line ?? "", ""], [it.field ?? "", ""], [it.reason, ""], [JSON.stringify(it.record), "record"]]) {
          const td = document.createElement("td"); td.textContent = v; if (cls) td.className = cls; tr.appendChild(td);
        }
        return tr;
      }));
      $("#rejects-count").textContent = `${page.matched} of ${page.total}`;
      $("#rejects-page").textContent = page.items.length ? `${offset + 1}–${offset + page.items.length}` : "0";
      $("#rejects-prev").disabled = offset === 0;
      $("#rejects-next").disabled = offset + LIMIT >= matched;
    }
    search.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(() => { offset = 0; load(); }, 250); });
    $("#rejects-prev").addEventListener("click", () => { offset = Math.max(0, offset - LIMIT); load(); });
    $("#rejects-next").addEventListener("click", () => { offset += LIMIT; load(); });
  }

  /* ------------------------------------------------------------------ new job */
  function jobForm() {
    let mode = "form", timer = null, seq = 0;
    const inputs = $$("[data-key]");
    const payload = () => mode === "yaml" ? {yaml: $("#job-yaml").value}
      : {values: Object.fromEntries(inputs.filter((i) => i.value !== i.dataset.default).map((i) => [i.dataset.key, i.value]))};
    function show(result) {
      $$(".field-error").forEach((e) => { e.hidden = true; e.textContent = ""; });
      $$(".field.invalid").forEach((f) => f.classList.remove("invalid"));
      const general = [];
      for (const err of result.errors || []) {
        const slot = mode === "form" && err.field && $(`[data-error-for="${CSS.escape(err.field)}"]`);
        if (slot) {
          slot.textContent = (slot.textContent ? slot.textContent + "\n" : "") + err.message;
          slot.hidden = false;
          slot.closest(".field").classList.add("invalid");
          slot.closest("fieldset").classList.remove("collapsed");
        } else general.push(err.message);
      }
      const box = $("#job-errors");
      box.textContent = result.valid ? "" : (general.length ? general.join("\n") : (result.message || "").split("\n")[0]);
      if (result.error) box.textContent = result.error;
      box.hidden = !box.textContent;
      $("#job-ok").hidden = !result.valid;
      if (result.yaml !== undefined) {
        const url = URL.createObjectURL(new Blob([result.yaml], {type: "application/x-yaml"}));
        $("#download-yaml").href = url;
      }
    }
    async function validate() {
      const mine = ++seq;
      const r = await fetch("/api/jobs/validate", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(payload())});
      const result = await r.json();
      if (mine === seq) { show(result); delete document.body.dataset.pending; }
      return result;
    }
    // body[data-pending] while an edit has not been validated yet (the download link is then stale)
    const soon = () => { document.body.dataset.pending = "1"; clearTimeout(timer); timer = setTimeout(validate, 300); };
    inputs.forEach((i) => i.addEventListener("input", soon));
    $("#job-yaml").addEventListener("input", soon);
    $$(".tab").forEach((t) => t.addEventListener("click", () => {
      $$(".tab").forEach((o) => o.classList.toggle("here", o === t));
      mode = t.dataset.tab === "yaml-tab" ? "yaml" : "form";
      $("#form-tab").hidden = mode !== "form";
      $("#yaml-tab").hidden = mode !== "yaml";
      validate();
    }));
    $$("fieldset legend").forEach((l) => l.addEventListener("click", () => l.parentElement.classList.toggle("collapsed")));
    $("#launch-job").addEventListener("click", async () => {
      $("#launch-state").textContent = "launching...";
      const r = await fetch("/api/jobs", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(payload())});
      const result = await r.json();
      if (r.ok) { $("#launch-state").textContent = "launched"; location.href = "/runs/" + result.run; return; }
      $("#launch-state").textContent = "not launched";
      show(result.errors ? result : {valid: false, errors: [], error: result.error || JSON.stringify(result)});
    });
    $("#plan-run").addEventListener("click", async () => {
      const out = $("#plan-out");
      out.hidden = false; out.textContent = "planning...";
      const r = await fetch("/api/jobs/plan", {method: "POST", headers: {"Content-Type": "application/json"},
        body: JSON.stringify({...payload(), gpu: $("#plan-gpu").value, gpus: Number($("#plan-gpus").value)})});
      const result = await r.json();
      out.textContent = r.ok ? result.plan : (result.error || result.message || JSON.stringify(result));
    });
    validate();
  }

  /* ------------------------------------------------------------------ chat */
  function chat() {
    const state = $("#chat-state");
    const post = (url, body) => fetch(url, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
    async function ready(gateway, model) {  // a gateway's /health says 503 while its model loads
      for (;;) {
        const h = await fetch(gateway + "/health");
        const health = await h.json();
        if (h.ok && health.models.includes(model)) return null;
        if (health.status === "failed") return "failed: " + health.error;
        if (h.status === 404) return health.error?.message || "not found";
        await new Promise((res) => setTimeout(res, 500));
      }
    }
    async function open() {
      $("#chat-send").disabled = true;
      state.textContent = "loading...";
      const targets = ["a", "b"].map((side) => {
        const v = $(`#chat-target-${side}`).value;
        return v === "model:" ? "model:" + $(`#chat-model-${side}`).value : v;
      }).filter((v) => v);
      if (!targets.length) { state.textContent = "choose at least one model"; return; }
      const opened = [];
      for (const target of targets) {
        const r = await post("/api/chat/open", {target});
        const body = await r.json();
        if (!r.ok) { state.textContent = body.error || JSON.stringify(body); return; }
        opened.push(body);
      }
      const problems = (await Promise.all(opened.map((o) => ready(o.gateway, o.model)))).filter((p) => p);
      if (problems.length) { state.textContent = problems.join("; "); return; }
      $("#chat-panes").replaceChildren(...opened.map((o, i) => {
        const pane = document.createElement("div");
        pane.className = "pane"; pane.dataset.model = o.model; pane.dataset.gateway = o.gateway; pane.dataset.side = "ab"[i];
        pane.innerHTML = "<h3></h3><div class='answer'></div><div class='meta finish'></div>" + (o.feedback
          ? "<div class='rate' hidden><textarea class='correction' rows='2' placeholder='a better answer (optional)'></textarea>" +
            "<button type='button' class='thumb' data-rating='up' title='thumbs up: a good answer'>&#9650; up</button>" +
            "<button type='button' class='thumb' data-rating='down' title='thumbs down: a bad answer'>&#9660; down</button>" +
            "<span class='meta rate-result'></span><div class='meta'>saved to <code></code></div></div>"
          : "<div class='meta rate-off'>rating: off here (this pane runs in the studio itself); serve the run " +
            "from its run page to rate answers: a served run keeps an audit log with text, which ratings join</div>");
        pane.querySelector("h3").textContent = `${"AB"[i]}: ${o.label}`;
        if (o.feedback) {
          pane.querySelector(".rate code").textContent = o.feedback;
          pane.querySelectorAll(".thumb").forEach((b) => b.addEventListener("click", () => rate(pane, b.dataset.rating)));
        }
        return pane;
      }));
      state.textContent = "ready: " + opened.map((o) => o.label).join(" | ");
      $("#chat-send").disabled = false;
    }
    /* thumbs (and an edited answer) for a served run: POST /v1/feedback through the proxy */
    async function rate(pane, rating) {
      const result = pane.querySelector(".rate-result"), correction = pane.querySelector(".correction").value.trim();
      const body = {id: pane.dataset.answer, rating};
      if (correction) body.correction = correction;
      result.textContent = "saving...";
      const r = await post(pane.dataset.gateway + "/v1/feedback", body);
      const reply = await r.json().catch(() => ({}));
      result.textContent = r.ok ? `saved (${rating}${correction ? ", with a correction" : ""})`
        : `not saved: ${reply.error?.message || r.statusText}`;
      result.dataset.ok = r.ok ? "1" : "0";
    }
    async function ask(pane) {
      const out = pane.querySelector(".answer"), finish = pane.querySelector(".finish");
      const box = pane.querySelector(".rate");
      if (box) { box.hidden = true; pane.querySelector(".rate-result").textContent = ""; }
      out.textContent = ""; finish.textContent = "streaming..."; delete pane.dataset.answer;
      const r = await post(pane.dataset.gateway + "/v1/chat/completions", {model: pane.dataset.model, stream: true,
        messages: [{role: "user", content: $("#chat-prompt").value}],
        max_tokens: Number($("#chat-max-tokens").value), temperature: Number($("#chat-temperature").value)});
      if (!r.ok) { finish.textContent = (await r.json()).error?.message || r.statusText; pane.dataset.done = "1"; return; }
      const reader = r.body.getReader(), decoder = new TextDecoder();
      let buffer = "", chunks = 0;
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, {stream: true});
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
          const data = event.replace(/^data: /, "");
          if (data === "[DONE]") continue;
          const msg = JSON.parse(data);
          if (msg.error) { finish.textContent = msg.error.message; continue; }
          pane.dataset.answer = msg.id;
          const choice = msg.choices[0];
          if (choice.delta.content) { out.textContent += choice.delta.content; chunks += 1; }
          if (choice.finish_reason) finish.textContent = `finish: ${choice.finish_reason}, ${chunks} chunks`;
        }
      }
      if (box && pane.dataset.answer) box.hidden = false;
      pane.dataset.done = "1";
    }
    for (const side of ["a", "b"]) {  // the model-name box only where "a base model" is chosen
      const select = $(`#chat-target-${side}`), box = $(`#chat-model-${side}`);
      const sync = () => { box.hidden = select.value !== "model:"; };
      select.addEventListener("change", sync); sync();
    }
    $("#chat-open").addEventListener("click", open);
    $("#chat-send").addEventListener("click", () => $$(".pane").forEach((p) => { p.dataset.done = ""; ask(p); }));
    if ($("#chat-target-a").value || $("#chat-target-b").value) open();
  }

  /* ------------------------------------------------------------------ data review */
  function review(did) {
    $("#apply-review").addEventListener("click", async () => {
      const verdicts = {};
      for (const tr of $$("#review tr[data-id]")) {
        const get = (cls) => $("." + cls, tr).value;
        if (get("verdict")) verdicts[tr.dataset.id] = {verdict: get("verdict"), edited_prompt: get("edited_prompt"),
                                                        edited_answer: get("edited_answer"), note: get("note")};
      }
      const state = $("#review-state");
      state.textContent = "applying...";
      const r = await fetch(`/api/data/${did}/review`, {method: "POST", headers: {"Content-Type": "application/json"},
        body: JSON.stringify({verdicts})});
      const body = await r.json();
      if (!r.ok) { state.textContent = body.error || JSON.stringify(body); state.className = "error"; return; }
      state.className = "ok";
      state.textContent = `applied ${body.file}: ${JSON.stringify(body.verdicts)}; splits now ${JSON.stringify(body.splits)}`;
      for (const [split, n] of Object.entries(body.splits)) {
        const cell = $(`#splits td[data-split="${split}"]`);
        if (cell) cell.textContent = n;
      }
    });
  }

  /* ------------------------------------------------------------------ blind A/B grading */
  function grade(eid, a, b, grader) {
    $("#grade-save").addEventListener("click", async () => {
      const scores = {};
      for (const pane of $$(".pane[data-slot]")) {
        scores[pane.dataset.slot] = Object.fromEntries($$("select.criterion", pane).map((s) => [s.dataset.criterion, Number(s.value) || null]));
      }
      const preferred = ($("input[name=preferred]:checked") || {}).value || "";
      const r = await fetch(`/api/evals/${eid}/grades`, {method: "POST", headers: {"Content-Type": "application/json"},
        body: JSON.stringify({index: Number($("#grade-item").dataset.index), a, b, grader, preferred, scores})});
      const body = await r.json();
      if (!r.ok) { $("#grade-state").textContent = body.error || JSON.stringify(body); return; }
      location.reload();
    });
  }

  return {lineChart, runPage, jobForm, chat, review, grade};
})();
