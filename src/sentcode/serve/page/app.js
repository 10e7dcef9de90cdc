// The sentcode playground: plain JavaScript over the server's own JSON routes (same origin only).
// Model output is only ever inserted with textContent / text nodes, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const DEFAULT_LENGTH = { tokens: 200, sentences: 3, segments: 20 };
let cards = [];
let running = [];  // AbortControllers of the streams in flight

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function setStatus(text) {
  $("status").textContent = text;
  $("status").hidden = !text;
}

// ---- talking to the server -------------------------------------------------------------------------------------

async function errorOf(resp) {
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (e) { /* not JSON */ }
  return `the server answered ${resp.status}`;
}

// POST a streaming request; call onEvent(payload) for each server-sent event until [DONE].
async function stream(path, body, onEvent, signal) {
  const resp = await fetch(path, {
    method: "POST", headers: { "content-type": "application/json" },
    body: JSON.stringify({ ...body, stream: true }), signal,
  });
  if (!resp.ok) throw new Error(await errorOf(resp));
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const payload = JSON.parse(data);
      if (payload.error) throw new Error(payload.error.message);
      onEvent(payload);
    }
  }
}

// ---- models and their cards ------------------------------------------------------------------------------------

function cardOf(name) {
  return cards.find((c) => c.id === name);
}

function fmtParams(n) {
  if (n === null || n === undefined) return "?";
  return n >= 1e6 ? `${(n / 1e6).toFixed(2)}M` : n >= 1e3 ? `${(n / 1e3).toFixed(1)}k` : String(n);
}

function renderCard(box, card) {
  box.replaceChildren();
  if (!card) return;
  box.append(el("strong", "name", card.id));
  if (card.status !== "ok") {
    box.append(el("span", `badge ${card.status}`, card.status === "loading" ? "loading…" : card.status));
    if (card.error) box.append(el("div", "card-error", card.error));
    return;
  }
  const rows = [
    ["family", card.label || card.family],
    ["parameters", fmtParams(card.parameters)],
    ["tokenizer", card.tokenizer ? `${card.tokenizer.kind}, ${card.tokenizer.vocab_size} ids` : "?"],
    ["held-out bpb", card.heldout ? `${card.heldout.bpb.toFixed(3)} (${card.heldout.split})` : "not recorded"],
    ["backend", card.backend],
    ["length counts", card.token_unit],
  ];
  const list = el("div", "facts");
  for (const [k, v] of rows) {
    const item = el("span", "fact");
    item.append(el("b", null, `${k} `), document.createTextNode(v));
    list.append(item);
  }
  box.append(list);
}

function fillSelect(select, keep) {
  select.replaceChildren();
  for (const c of cards) {
    const o = el("option", null, c.status === "ok" ? c.id : `${c.id} (${c.status})`);
    o.value = c.id;
    select.append(o);
  }
  if (keep && cardOf(keep)) select.value = keep;
}

async function loadModels() {
  let resp;
  try {
    resp = await fetch("/v1/models");
  } catch (e) {
    setStatus("The server cannot be reached; retrying…");
    setTimeout(loadModels, 1000);
    return;
  }
  if (!resp.ok) {
    setStatus(await errorOf(resp));
    setTimeout(loadModels, 1000);
    return;
  }
  cards = (await resp.json()).data;
  const a = $("model").value, b = $("model2").value;
  fillSelect($("model"), a);
  fillSelect($("model2"), b || (cards[1] && cards[1].id));
  const loading = cards.filter((c) => c.status === "loading").map((c) => c.id);
  const failed = cards.filter((c) => c.status === "failed").map((c) => c.id);
  if (loading.length) {
    setStatus(`Loading ${loading.join(", ")}…`);
    setTimeout(loadModels, 1000);
  } else if (failed.length) {
    setStatus(`Could not load ${failed.join(", ")} (see its card).`);
  } else {
    setStatus("");
  }
  onModelChange();
}

function onModelChange() {
  const card = cardOf($("model").value);
  renderCard($("card"), card);
  renderCard($("card-a"), card);
  renderCard($("card-b"), cardOf($("model2").value));
  for (const [input, label, c, name] of [["length", "length-label", card, "Length"],
    ["length2", "length2-label", cardOf($("model2").value), "Second length"]]) {
    const unit = (c && c.token_unit) || "tokens";
    $(label).textContent = `${name} (${unit})`;
    if (!$(input).dataset.touched || $(input).dataset.unit !== unit) $(input).value = DEFAULT_LENGTH[unit] || 100;
    $(input).dataset.unit = unit;
  }
  $("plan-toggle").hidden = !(card && card.plan);
}

// ---- generating ------------------------------------------------------------------------------------------------

function numberOf(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

function settings() {
  const body = { prompt: $("prompt").value, temperature: numberOf("temperature") ?? 0.8 };
  const topK = numberOf("top_k"), topP = numberOf("top_p"), seed = numberOf("seed"), length = numberOf("length");
  if (topK !== null) body.top_k = topK;
  if (topP !== null) body.top_p = topP;
  if (seed !== null) body.seed = seed;
  if (length !== null) body.max_tokens = length;
  return body;
}

function busy(on) {
  $("go").disabled = on;
  $("stop").disabled = !on;
}

async function completion(model, body, out, meta, signal) {
  out.replaceChildren();
  meta.textContent = "";
  const t0 = performance.now();
  let bytes = 0, finish = null;
  await stream("/v1/completions", { ...body, model }, (chunk) => {
    const choice = chunk.choices && chunk.choices[0];
    if (!choice) return;
    if (choice.text) {
      out.append(document.createTextNode(choice.text));
      bytes += new TextEncoder().encode(choice.text).length;
    }
    if (choice.finish_reason) finish = choice.finish_reason;
  }, signal);
  const s = (performance.now() - t0) / 1000;
  meta.textContent = `${bytes} bytes in ${s.toFixed(2)} s (${Math.round(bytes / Math.max(s, 1e-3))} bytes/s)` +
    (finish ? `, finished: ${finish}` : "");
}

function codes(list) {
  return list ? `[${list.join(" ")}]` : "none";
}

function renderSegment(seg, index) {
  const li = el("li", "segment");
  li.dataset.index = index;
  li.append(el("div", "segtext", seg.text));
  const line = el("div", "codes");
  line.append(el("span", "planned", `planned ${codes(seg.planned)}`), el("span", "written",
    `written ${codes(seg.written)}`));
  if (seg.agreement !== null && seg.agreement !== undefined) {
    line.append(el("span", seg.agreement >= 0.999 ? "agree full" : "agree", `agreement ${(100 * seg.agreement).toFixed(0)}%`));
  }
  li.append(line);
  if (seg.candidates && seg.candidates.length) {
    const det = el("details", "candidates");
    det.append(el("summary", null, `${seg.candidates.length} candidates, kept #${seg.chosen + 1}`));
    const ol = el("ol");
    seg.candidates.forEach((c, i) => {
      const item = el("li", i === seg.chosen ? "kept" : null);
      item.append(el("span", "segtext", c.text), el("span", "codes",
        ` ${codes(c.codes)} · agreement ${(100 * c.agreement).toFixed(0)}%` +
        (c.logprob !== null ? ` · mean log-prob ${c.logprob.toFixed(2)}` : "")));
      ol.append(item);
    });
    det.append(ol);
    li.append(det);
  }
  return li;
}

function renderLevels(levels, text) {
  const box = $("levels");
  box.replaceChildren(el("h3", null, "Segments and codes of the whole text"));
  const bytes = new TextEncoder().encode(text);
  const dec = new TextDecoder();
  const row = el("div", "chips");
  let at = 0;
  levels.segments.forEach((n, i) => {
    const chip = el("span", "chip");
    chip.append(el("span", "segtext", dec.decode(bytes.slice(at, at + n))), el("span", "code", codes(levels.codes[i])));
    row.append(chip);
    at += n;
  });
  box.append(el("p", "hint", `Level 1: ${levels.segments.length} segments, ${levels.levels} code(s) each, ` +
    `${levels.bytes_per_code.toFixed(2)} bytes per code.`), row);
  if (levels.level2) {
    const l2 = levels.level2;
    const row2 = el("div", "chips");
    l2.codes.forEach((c, i) => {
      row2.append(el("span", "chip code", `${l2.segments[i]} codes → ${codes(c)}`));
    });
    box.append(el("p", "hint", `Level 2: ${l2.codes.length} segments of level-1 codes, ` +
      `${l2.bytes_per_code.toFixed(2)} bytes per code.`), row2);
  }
}

async function planned(model, body, signal) {
  const out = $("output"), list = $("segments");
  out.replaceChildren();
  list.replaceChildren();
  $("levels").replaceChildren();
  $("plan").hidden = false;
  $("meta").textContent = "";
  const t0 = performance.now();
  let n = 0;
  await stream("/v1/plan", { ...body, model }, (ev) => {
    if (ev.segment) {
      out.append(document.createTextNode(ev.segment.text));
      list.append(renderSegment(ev.segment, ev.index));
      n += 1;
    } else if (ev.levels) {
      renderLevels(ev.levels, ev.text);
    }
  }, signal);
  $("meta").textContent = `${n} segments in ${((performance.now() - t0) / 1000).toFixed(2)} s`;
}

async function go() {
  showError("");
  const compare = !$("view-compare").hidden;
  const body = settings();
  const jobs = [];
  const ctl = () => { const c = new AbortController(); running.push(c); return c.signal; };
  busy(true);
  if (compare) {
    jobs.push(completion($("model").value, body, $("output-a"), $("meta-a"), ctl()));
    const second = { ...body };
    if (numberOf("length2") !== null) second.max_tokens = numberOf("length2");
    jobs.push(completion($("model2").value, second, $("output-b"), $("meta-b"), ctl()));
  } else {
    const card = cardOf($("model").value);
    if (card && card.plan && $("show-plan").checked) {
      jobs.push(planned($("model").value, body, ctl()));
    } else {
      $("plan").hidden = true;
      jobs.push(completion($("model").value, body, $("output"), $("meta"), ctl()));
    }
  }
  const results = await Promise.allSettled(jobs);
  const failed = results.find((r) => r.status === "rejected" && r.reason.name !== "AbortError");
  if (failed) showError(failed.reason.message);
  running = [];
  busy(false);
}

function stop() {
  for (const c of running) c.abort();
  running = [];
  busy(false);
}

function switchView(view) {
  for (const t of document.querySelectorAll(".tab")) t.classList.toggle("active", t.dataset.view === view);
  $("view-write").hidden = view !== "write";
  $("view-compare").hidden = view !== "compare";
  document.body.classList.toggle("comparing", view === "compare");
}

document.addEventListener("DOMContentLoaded", () => {
  $("go").addEventListener("click", go);
  $("stop").addEventListener("click", stop);
  $("model").addEventListener("change", onModelChange);
  $("model2").addEventListener("change", onModelChange);
  for (const id of ["length", "length2"]) $(id).addEventListener("input", () => { $(id).dataset.touched = "1"; });
  for (const t of document.querySelectorAll(".tab")) t.addEventListener("click", () => switchView(t.dataset.view));
  $("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) go(); });
  loadModels();
});
